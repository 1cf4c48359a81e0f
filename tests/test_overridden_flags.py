"""HF TrainingArguments flags that pat-hf's recipe replaces fail in one line; HF's dataset flags work."""

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features
from PIL import Image

from pat_hf.cli.parser import parse_arguments
from pat_hf.config.overridden_flags import OVERRIDDEN_FLAGS
from pat_hf.data.sources import load_splits

INSTEAD = {
    "optim": "--opt NAME", "optim_args": "--opt-eps", "optim_target_modules": "drop the flag",
    "adam_beta1": "--opt-betas", "adam_beta2": "--opt-betas", "adam_epsilon": "--opt-eps",
    "lr_scheduler_type": "--sched", "lr_scheduler_kwargs": "--min-lr", "warmup_steps": "--warmup-epochs",
    "warmup_ratio": "--warmup-epochs", "label_smoothing_factor": "--smoothing", "train_sampling_strategy": "drop",
    "hub_strategy": "drop the flag", "hub_always_push": "drop the flag",
}
VALUES = {"adam_beta1": "0.8", "adam_beta2": "0.9", "adam_epsilon": "1e-6", "warmup_steps": "10",
          "warmup_ratio": "0.1", "label_smoothing_factor": "0.1", "hub_always_push": "true",
          "lr_scheduler_kwargs": "{}", "hub_strategy": "end", "train_sampling_strategy": "sequential"}


def test_every_overridden_flag_is_covered():
    assert set(OVERRIDDEN_FLAGS) == set(INSTEAD)


@pytest.mark.parametrize("flag", sorted(INSTEAD))
def test_an_overridden_flag_names_what_to_use_instead(flag):
    with pytest.raises(ValueError) as error:
        parse_arguments([f"--{flag}", VALUES.get(flag, "x"), "--output_dir", "/tmp/unused"])
    message = str(error.value)
    assert message.startswith(f"--{flag} is not used by pat-hf (") and INSTEAD[flag] in message
    assert "\n" not in message


def test_the_dashed_and_equals_spellings_are_caught_too():
    with pytest.raises(ValueError, match=r"^--lr_scheduler_type is not used by pat-hf .*use --sched"):
        parse_arguments(["--lr-scheduler-type=cosine"])
    with pytest.raises(ValueError, match=r"^--optim is not used by pat-hf \(it trains with timm's optimizer\); "
                                         r"use --opt NAME, e.g. --opt adamw$"):
        parse_arguments(["--optim", "adamw_torch"])


def test_an_overridden_key_in_a_config_or_its_base_fails(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 3\nwarmup_steps: 100\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nlr: 0.1\n")
    with pytest.raises(ValueError) as error:
        parse_arguments(["--config", str(tmp_path / "run.yaml")])
    assert str(error.value) == (f"key 'warmup_steps' in {tmp_path / 'base.yaml'} is not used by pat-hf (it follows "
                                f"timm's learning-rate schedule, stepped per epoch); use --warmup-epochs N and "
                                f"--warmup-lr LR")
    (tmp_path / "hf.yaml").write_text("label-smoothing-factor: 0.1\n")
    with pytest.raises(ValueError, match="^key 'label_smoothing_factor' in .*use --smoothing EPS$"):
        parse_arguments(["-c", str(tmp_path / "hf.yaml")])


def test_recipe_flags_still_parse():
    args = parse_arguments(["--opt", "adamw", "--sched", "step", "--warmup-epochs", "2", "--smoothing", "0.2",
                            "--opt-betas", "0.8", "0.9", "--output_dir", "/tmp/unused"])
    assert (args.recipe.opt, args.recipe.sched, args.recipe.warmup_epochs) == ("adamw", "step", 2)


def test_dataset_name_and_config_name_reach_load_dataset(monkeypatch, tmp_path):
    args = parse_arguments(["--dataset_name", "someone/shapes", "--dataset_config_name", "small"])
    assert (args.data.dataset, args.data.dataset_config_name) == ("someone/shapes", "small")
    (tmp_path / "hf.yaml").write_text("dataset_name: someone/shapes\ndataset_config_name: large\n")
    from_yaml = parse_arguments(["--config", str(tmp_path / "hf.yaml")]).data
    assert (from_yaml.dataset, from_yaml.dataset_config_name) == ("someone/shapes", "large")

    requested = []
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=["a", "b"])})
    split = Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]}, features=features)

    def fake_load_dataset(path, name=None, **kwargs):
        requested.append((path, name))
        return DatasetDict(train=split, test=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, evaluation, _ = load_splits(args.data)
    assert requested == [("someone/shapes", "small")] and len(train) == len(evaluation) == 2
