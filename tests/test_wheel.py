"""The built wheel, installed into a fresh virtual environment, trains from a directory that is not the repository.

Reinstalling torch & co. would take minutes, so the fresh environment sees this one's site-packages through a
`.pth` file, and the wheel is installed with --no-deps before that file exists (pip then sees only the new
environment). pat_hf itself must then come from the wheel, not from the repository or an editable install.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from huggingface_hub import ModelCard

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "output",
                                      "outputs", "runs", ".pytest_cache", ".ruff_cache", "notebooks")
TINY = ["--epochs", "1", "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "16",
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _accuracies(student: Path) -> dict[str, float]:
    card = ModelCard.load(student / "README.md")
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def test_the_wheel_installs_and_trains_with_its_console_scripts_and_accelerate(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_PACKAGED)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels),
          str(source)], cwd=tmp_path, env=dict(os.environ))
    (wheel,) = wheels.glob("pat_hf-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=dict(os.environ))
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], cwd=tmp_path, env=dict(os.environ))
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=dict(os.environ)).strip())
    (venv_site / "shared_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
               OMP_NUM_THREADS="1")
    imported_from = _run([str(python), "-c", "import pat_hf; print(pat_hf.__file__)"], cwd=workdir, env=env).strip()
    assert Path(imported_from).is_relative_to(venv_site), imported_from

    for script in ("pat-hf-push", "pat-hf-evaluate"):
        assert "usage:" in _run([str(venv / "bin" / script), "--help"], cwd=workdir, env=env)
    _run([str(venv / "bin" / "pat-hf-train"), "--config", "smoke", "--output_dir", "by_script", *TINY],
         cwd=workdir, env=env)
    _run([str(python), "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu", "--num_processes", "1",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "pat_hf.cli.train", "--config", "smoke", "--output_dir", "by_accelerate", *TINY], cwd=workdir, env=env)
    for run in ("by_script", "by_accelerate"):
        accuracies = _accuracies(workdir / run / "student")
        assert set(accuracies) == {"accuracy", "top_5_accuracy"}
        assert 0.0 <= accuracies["accuracy"] <= accuracies["top_5_accuracy"] <= 100.0
