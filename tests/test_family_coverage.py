"""A smoke run of benchmarks/family_coverage.py on a few families (the full run takes tens of minutes)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "family_coverage.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("family_coverage", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.benchmark
def test_family_coverage_smoke_run(tmp_path):
    families = ["levit", "resnet", "efficientvit_msra"]  # tokens and maps, three resolutions and four
    output = tmp_path / "coverage.md"
    table = load_benchmark().main(["--families", ",".join(families), "--output", str(output), "--timeout", "120"])
    assert output.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.count(" | ") == 4
            and not line.startswith("| family")]
    assert len(rows) == len(families) * 2 * 5
    assert all(row.endswith("| works |") for row in rows), [row for row in rows if not row.endswith("| works |")]
    assert f"**{len(families)} of {len(families)} families work in every role with every distiller**" in table
    assert "Traceback" not in table
