"""A real two-process CPU (gloo) DDP training through accelerate launch and accelerate_configs/cpu.yaml."""

import json

import torch
from safetensors.torch import load_file

from tests.helpers import run_two_processes, save_teacher, tiny_run


def test_two_processes_end_with_identical_students(tmp_path):
    teacher = save_teacher(tmp_path)
    output = tmp_path / "run"
    flags = tiny_run(output, teacher, "--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16",
                     samples=96)
    result = run_two_processes(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(output / f"student_rank{r}_of_2.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # 96 examples / (2 processes x 16)
