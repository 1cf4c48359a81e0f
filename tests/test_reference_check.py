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


@needs_golden
def test_reference_training_checkpoint_converts(tmp_path):
    """A reference checkpoint/ file (student in state_dict, whole distiller in state_dict_ema) converts into
    a pat-hf distiller state that reproduces the reference's losses."""
    import argparse

    import torch
    from safetensors.torch import load_file

    from pat_hf.reference import main as convert
    from pat_hf.reference_check import build_distiller

    fixture = GOLDEN / "swin_to_resnet.safetensors"
    meta = json.loads(fixture.with_suffix(".json").read_text())
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(fixture)).items()}
    distiller_state = {k: v for k, v in state.items() if k.startswith(("student.", "teacher."))}
    distiller_state.update({k.removeprefix("extra.pat."): v for k, v in state.items() if k.startswith("extra.pat.")})
    checkpoint = tmp_path / "last.pth.tar"
    torch.save({"epoch": 1, "state_dict": {k.removeprefix("student."): v for k, v in state.items()
                                           if k.startswith("student.")},
                "state_dict_ema": distiller_state, "args": argparse.Namespace(distiller="pat")}, checkpoint)
    convert([str(checkpoint), "--distiller", "pat", "--model", "resnet18", "--model-kwargs",
             json.dumps(meta["student"]["kwargs"]), "--num-classes", "100", "--output", str(tmp_path / "out")])
    converted = load_file(str(tmp_path / "out" / "distiller.safetensors"))
    assert not any(k.startswith("teacher.") for k in converted)
    distiller = build_distiller(meta, load_file(str(fixture)), "pat")
    with torch.no_grad():  # forget what build_distiller loaded: the converted file alone must restore it
        for parameter in [*distiller.student.parameters(), *distiller.extra_parameters()]:
            parameter.zero_()
    missing, unexpected = distiller.load_state_dict(converted, strict=False)
    assert not unexpected and not missing
    distiller.train()
    out = distiller(state["input.x1"], state["input.y1"])
    for key, value in meta["distillers"]["pat"]["step1"].items():
        assert float(out[key].detach()) == pytest.approx(value, rel=1e-4), key
    student = load_file(str(tmp_path / "out" / "student.safetensors"))
    assert torch.equal(student["fc.weight"], distiller.student.fc.weight)
