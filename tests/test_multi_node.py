"""Two "machines" on this one: two `accelerate launch` processes with accelerate_configs/multi_node.yaml,
machine ranks 0 and 1, one CPU (gloo) process each, end with the student that one machine with two processes
trains on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import save_teacher, tiny_run

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "ddp_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 300


def launch(config: str, flags: list[str], *launch_flags: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / config), *launch_flags, WORKER, *flags]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_all(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        codes = [process.wait(timeout=TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for code, log in zip(codes, logs):
        assert code == 0, f"{log.name}:\n{log.read_text()[-3000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def students(output: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(output / f"student_rank{rank}_of_2.safetensors")) for rank in range(2)]


def test_two_machines_train_the_student_of_one_machine_with_two_processes(tmp_path):
    teacher = save_teacher(tmp_path)

    def run_flags(output: Path) -> list[str]:
        return tiny_run(output, teacher, "--distiller", "pat", "--pat-raa-dim", "32", "--pat-raa-num-queries", "16",
                        samples=96)

    one_machine, two_machines = tmp_path / "one_machine", tmp_path / "two_machines"
    log = tmp_path / "one_machine.log"
    wait_all([launch("cpu.yaml", run_flags(one_machine), log=log)], [log])

    port = str(free_port())
    logs = [tmp_path / f"machine{rank}.log" for rank in range(2)]
    machines = [launch("multi_node.yaml", run_flags(two_machines), "--num_machines", "2", "--num_processes", "2",
                       "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                       log=logs[rank])
                for rank in range(2)]
    wait_all(machines, logs)
    assert json.loads((two_machines / "trainer_state.json").read_text())["global_step"] == 3  # 96 / (2 x 16)

    reference = students(one_machine)[0]
    for student in [*students(one_machine), *students(two_machines)]:
        assert student.keys() == reference.keys()
        for key in reference:
            assert torch.equal(student[key], reference[key]), key
