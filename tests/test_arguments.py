import pytest

from pat_hf.cli.parser import parse_arguments
from pat_hf.distillers import DISTILLERS
from pat_hf.distillers.fitnet import FitNetArguments


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_reference_flag_names_map_onto_training_arguments(tmp_path):
    args = parse_arguments(["--model", "test_vit", "--teacher", "", "--batch-size", "16", "--lr", "0.1",
                            "--epochs", "3", "--clip-grad", "5", "--weight-decay", "0.01", "--seed", "7",
                            "--output", str(tmp_path), "--distiller", "kd", "--kd-temperature", "4"])
    t = args.training
    assert (t.per_device_train_batch_size, t.learning_rate, t.num_train_epochs) == (16, 0.1, 3)
    assert (t.max_grad_norm, t.weight_decay, t.seed, t.output_dir) == (5.0, 0.01, 7, str(tmp_path))
    assert args.model.teacher == ""
    assert args.distill.kd_temperature == 4.0


def test_data_subsets_are_drawn_with_data_seed_else_seed(tmp_path):
    """One rule for training, evaluation and export: a run's subsets are drawn again with the seed it used."""
    from pat_hf.config.arguments import DistillTrainingArguments

    assert parse_arguments(["--output", str(tmp_path), "--seed", "7"]).training.subset_seed == 7
    assert parse_arguments(["--output", str(tmp_path), "--seed", "7", "--data_seed", "3"]).training.subset_seed == 3
    assert DistillTrainingArguments.subset_seed_of({"seed": 7, "data_seed": None}) == 7
    assert DistillTrainingArguments.subset_seed_of({"seed": 7, "data_seed": 3}) == 3
    assert DistillTrainingArguments.subset_seed_of({}) == DistillTrainingArguments.seed


def test_hf_names_work_too(tmp_path):
    args = parse_arguments(["--output_dir", str(tmp_path), "--per_device_train_batch_size", "4",
                            "--learning_rate", "0.2", "--logging_steps", "7", "--report_to", "none"])
    assert args.training.per_device_train_batch_size == 4
    assert args.training.learning_rate == 0.2
    assert args.training.logging_steps == 7


def test_reference_defaults():
    t = parse_arguments([]).training
    # The Trainer's max_grad_norm=1.0 must not leak: the reference clips only when --clip-grad is given.
    assert t.max_grad_norm == 0.0
    assert (t.learning_rate, t.weight_decay, t.seed, t.per_device_train_batch_size) == (0.05, 2e-5, 42, 128)
    assert t.remove_unused_columns is False and t.label_names == ["labels"] and t.dataloader_drop_last


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config = write(tmp_path, "lr: 0.5\nbatch_size: 64\nclip_grad: 5.0\nopt: adamw\npat_afp_stage: [1, 3]\n"
                             "model_kwargs: {img_size: 32}\n")
    args = parse_arguments(["--config", config, "--lr", "0.25", "--distiller", "pat"])
    assert args.training.learning_rate == 0.25
    assert args.training.per_device_train_batch_size == 64
    assert args.training.max_grad_norm == 5.0
    assert args.recipe.opt == "adamw"
    assert args.hparams.pat_afp_stage == [1, 3]
    assert args.model.model_kwargs == {"img_size": 32}


def test_yaml_null_clip_grad_means_no_clipping(tmp_path):
    args = parse_arguments(["--config", write(tmp_path, "clip_grad: null\n")])
    assert args.training.max_grad_norm == 0.0


def test_unknown_yaml_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'learning_rat'"):
        parse_arguments(["--config", write(tmp_path, "learning_rat: 0.1\n")])


def test_unknown_flag_is_named():
    with pytest.raises(SystemExit):
        parse_arguments(["--no-such-flag", "1"])


def test_unknown_distiller_is_named():
    with pytest.raises(ValueError, match="unknown distiller 'nope'"):
        parse_arguments(["--distiller", "nope"])


def test_bad_model_kwargs_json():
    with pytest.raises(ValueError, match="--model-kwargs must be a JSON object"):
        parse_arguments(["--model-kwargs", "{img_size: 32"])


def test_push_to_hub_targets_the_student_not_checkpoints():
    args = parse_arguments(["--push-to-hub"])
    assert args.training.push_student_to_hub is True
    assert args.training.push_to_hub is False


def test_amp_on_cpu_means_bf16():
    args = parse_arguments(["--amp", "--use_cpu"])
    assert args.training.bf16 is True and args.training.fp16 is False


def test_help_lists_the_registered_distillers(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"distillation method: {' | '.join(DISTILLERS)}" in text
    assert "--pat-raa-dim" not in text


def test_help_with_a_distiller_shows_its_own_options_only(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--help", "--distiller", "pat"])
    text = capsys.readouterr().out
    assert "--distiller pat:" in text and "--pat-raa-dim" in text and "--pat-mode" in text
    assert "--ofa-eps" not in text and "--fitnet-stages" not in text


def test_a_flag_of_another_distiller_names_its_distiller(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--distiller", "kd", "--pat-raa-dim", "32"])
    assert "--pat-raa-dim belongs to --distiller pat, not kd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_arguments(["--ofa-eps=1", "--distiller=dkd"])
    assert "--ofa-eps belongs to --distiller ofa, not dkd" in capsys.readouterr().err


def test_a_yaml_key_of_another_distiller_names_its_distiller(tmp_path):
    config = write(tmp_path, "distiller: kd\nfitnet_loss_weight: 2.0\n")
    with pytest.raises(ValueError, match=r"key 'fitnet_loss_weight' in .*config.yaml belongs to --distiller fitnet, "
                                         r"not kd"):
        parse_arguments(["--config", config])


def test_the_distiller_may_come_from_the_yaml_and_its_hyperparameters_are_parsed(tmp_path):
    args = parse_arguments(["--config", write(tmp_path, "distiller: fitnet\nfitnet_stages: [2, 4]\n")])
    assert isinstance(args.hparams, FitNetArguments) and args.hparams.fitnet_stages == [2, 4]
    assert parse_arguments(["--distiller", "kd"]).hparams is None


@pytest.mark.parametrize("flags,message", [
    (["--distiller", "pat", "--pat-raa-num-queries", "80"], "--pat-raa-num-queries must be 4*k*k"),
    (["--distiller", "pat", "--pat-raa-dim", "36"], "--pat-raa-dim must be even and divisible by 8 heads, got 36"),
    (["--distiller", "pat", "--pat-mode", "fixed"], "--pat-mode must be one of ('reference', 'corrected')"),
    (["--distiller", "pat", "--pat-afp-stage", "0", "5"], "--pat-afp-stage takes stages 1-4, got [0, 5]"),
    (["--distiller", "fitnet", "--fitnet-stages", "1", "1"], "--fitnet-stages takes distinct stages 1-4"),
    (["--distiller", "ofa", "--ofa-stage", "5"], "--ofa-stage takes distinct stages 1-4, got [5]"),
    (["--distiller", "ofa", "--ofa-stage", "3", "4", "--ofa-eps", "1", "1"], "--ofa-eps needs 1 or 3 values"),
])
def test_hyperparameters_are_checked_as_they_are_parsed(flags, message):
    with pytest.raises(ValueError) as error:
        parse_arguments(flags)
    assert message in str(error.value) and "\n" not in str(error.value)
