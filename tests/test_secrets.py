"""The Hub token stays secret: it reaches the Hub client and nothing else (logs, args.yaml, trainer_state.json,
checkpoints, the exported student and its model card, TensorBoard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_FAKEtokenThatMustNeverBeWritten0123456789"
# The console script with the Hub client replaced by tests.helpers.FakeHfApi; its calls are saved as JSON.
CHILD = """
import json, sys
from pat_hf.cli import train
from pat_hf.export import hub
from tests.helpers import FakeHfApi
hub.HfApi = FakeHfApi
try:
    train.cli(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(json.dumps(FakeHfApi.calls, default=str))
"""


def test_the_hub_token_is_never_written_or_logged(tmp_path):
    output = tmp_path / "run"
    argv = tiny_run(output, None, "--distiller", "vanilla", "--epochs", "2", "--model-ema", "--report_to",
                    "tensorboard", "--log_level", "info", "--push-to-hub", "--hub_model_id", "someone/secret-test",
                    "--hub_token", TOKEN)
    calls = tmp_path / "calls.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(calls), *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ["init", TOKEN] in json.loads(calls.read_text()), "the token should reach the Hub client"
    assert any(call[0] == "upload_folder" for call in json.loads(calls.read_text()))

    written = sorted(p for p in output.rglob("*") if p.is_file())
    names = {p.relative_to(output).as_posix() for p in written}
    assert {"args.yaml", "trainer_state.json", "student/README.md", "student/model.safetensors"} <= names
    assert any(name.startswith("runs/") for name in names) and any(name.startswith("checkpoint-") for name in names)
    leaking = [p.relative_to(output).as_posix() for p in written if TOKEN.encode() in p.read_bytes()]
    assert leaking == [], f"the token was written into {leaking}"
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert "<HUB_TOKEN>" in (output / "args.yaml").read_text()
