"""Parity with the reference: every shipped fixture x every distiller it records, through reference_check."""

import json
import os
from pathlib import Path

import pytest

from pat_hf.reference_check import format_table, main, recorded_distillers, run_check

GOLDEN = Path(os.environ.get("PAT_HF_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
FIXTURES = sorted(GOLDEN.glob("*.safetensors")) if GOLDEN.is_dir() else []
CASES = [(path, name) for path in FIXTURES for name in recorded_distillers(path)]
needs_golden = pytest.mark.skipif(not FIXTURES, reason=f"reference fixtures not found in {GOLDEN} "
                                                       "(set PAT_HF_GOLDEN_DIR); they ship beside the repo in CI")


@needs_golden
@pytest.mark.parametrize("fixture,distiller", CASES, ids=[f"{p.stem}-{d}" for p, d in CASES])
def test_matches_the_reference(fixture, distiller):
    comparisons = run_check(fixture, distiller)
    assert all(c.ok for c in comparisons), format_table(fixture.stem, distiller, comparisons)


@needs_golden
def test_every_fixture_records_the_core_distillers():
    for path in FIXTURES:
        assert {"vanilla", "kd", "dkd", "dist", "pat"} <= set(recorded_distillers(path)), path


@needs_golden
def test_cli_exit_status(tmp_path, capsys):
    fixture = FIXTURES[0]
    assert main([str(fixture), "--distiller", "kd"]) == 0
    assert "OK: every quantity within tolerance" in capsys.readouterr().out
    # A fixture whose recorded loss is off by 1% must fail, whatever the pair.
    broken = json.loads(fixture.with_suffix(".json").read_text())
    broken["distillers"]["kd"]["step2"]["loss_kd"] *= 1.01
    (tmp_path / fixture.name).symlink_to(fixture)
    (tmp_path / fixture.with_suffix(".json").name).write_text(json.dumps(broken))
    assert main([str(tmp_path / fixture.name), "--distiller", "kd"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
