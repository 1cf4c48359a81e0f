"""Test-wide settings: offline Hub, one CPU thread (small ops get slower with two)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def fake_hub(monkeypatch):
    """pat_hf.hub talking to a FakeHfApi that records its calls (tests.helpers), never to the network."""
    from pat_hf.export import hub
    from tests.helpers import FakeHfApi

    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "refuse", None)
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi
