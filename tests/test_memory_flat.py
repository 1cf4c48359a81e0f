"""benchmarks/memory_flat.py: its verdict (always run) and a short run of it (`-m benchmark`)."""

import pytest

from benchmarks import memory_flat
from benchmarks.memory_flat import NOISE_MIB, Verdict


def test_growth_is_judged_after_warm_up():
    warming_then_flat = {100: 900.0, 200: 1000.0, 300: 1004.0, 400: 1001.0, 500: 1003.0}
    verdict = Verdict(warming_then_flat, warm_step=200)
    assert verdict.flat and verdict.growth_mib == pytest.approx(4.0)
    assert "| 200 | 1000.0 | +100.0 |" in verdict.table()
    leaking = {step: 1000.0 + step * 0.1 for step in range(100, 2100, 100)}
    verdict = Verdict(leaking, warm_step=500)
    assert not verdict.flat and verdict.growth_mib > NOISE_MIB
    assert verdict.slope_mib_per_1000 == pytest.approx(100.0)
    assert "GROWING" in verdict.summary()


@pytest.mark.benchmark
def test_a_short_run_stays_flat():
    verdict = memory_flat.main(["--steps", "300", "--every", "50"])
    assert sorted(verdict.rss) == list(range(50, 301, 50))
    assert verdict.flat, verdict.summary()
