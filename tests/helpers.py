"""Small pieces shared by the end-to-end tests: a tiny teacher checkpoint and the flags of a tiny run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import timm
import torch
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ["--model", "test_vit", "--model-kwargs", '{"img_size": 32, "patch_size": 4}', "--img-size", "32"]


def save_teacher(directory: Path, name: str = "test_resnet", num_classes: int = 10) -> str:
    """A random-init teacher, the same whatever ran before (its features set the targets of the tests)."""
    path = directory / f"{name}_teacher.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(name, num_classes=num_classes).state_dict(), str(path))
    return str(path)


def tiny_run(output_dir: Path, teacher: str | None, *extra: str, samples: int = 64) -> list[str]:
    """Flags of a few-step run on the digits data (offline), small enough for a 2-core CI machine. Data are
    loaded in the training process (--workers 0): a worker process costs more to start than it saves here."""
    teacher_flags = ["--teacher", "test_resnet", "--teacher-pretrained", teacher] if teacher else ["--teacher", ""]
    return [*STUDENT, *teacher_flags, "--dataset", "digits", "--max-train-samples", str(samples),
            "--max-eval-samples", "32", "--batch-size", "16", "--epochs", "1", "--lr", "0.001", "--opt", "adamw",
            "--smoothing", "0", "--output_dir", str(output_dir), "--report_to", "none", "--logging_steps", "2",
            "--disable_tqdm", "true", "--workers", "0", *extra]


def run_two_processes(flags: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py under a real two-process CPU (gloo) DDP launch, accelerate_configs/cpu.yaml; on a
    timeout the launcher and its workers are killed together."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "tests" / "ddp_worker.py"), *flags]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi (no network): records every call in order in `calls`, resolves a
    bare repository name under the namespace `user`, and refuses everything when `refuse` holds an error."""

    calls: list[tuple] = []
    user = "someone"
    refuse: Exception | None = None

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def _record(self, *call):
        self.calls.append(call)
        if self.refuse is not None:
            raise self.refuse

    def create_repo(self, repo_id, *, private=None, exist_ok=False):
        self._record("create_repo", repo_id, private, exist_ok)
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else f'{self.user}/{repo_id}'}")

    def auth_check(self, repo_id, *, write=False):
        self._record("auth_check", repo_id, write)

    def create_branch(self, repo_id, *, branch, exist_ok=False):
        self._record("create_branch", repo_id, branch, exist_ok)

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision=None, create_pr=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self._record("upload_folder", repo_id, folder_path, commit_message, revision, create_pr, files)
        url = f"https://huggingface.co/{repo_id}"
        return CommitInfo(commit_url=f"{url}/commit/0123abc", commit_message=commit_message, commit_description="",
                          oid="0123abc", pr_url=f"{url}/discussions/1" if create_pr else None)

    @classmethod
    def named(cls, name: str) -> list[tuple]:
        return [call for call in cls.calls if call[0] == name]
