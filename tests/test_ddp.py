"""A real two-process CPU (gloo) DDP training through accelerate launch and accelerate_configs/cpu.yaml."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import save_teacher, tiny_run

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_end_with_identical_students(tmp_path):
    teacher = save_teacher(tmp_path)
    output = tmp_path / "run"
    flags = tiny_run(output, teacher, "--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16",
                     samples=96)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "tests" / "ddp_worker.py"), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(output / f"student_rank{r}_of_2.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # 96 examples / (2 processes x 16)
