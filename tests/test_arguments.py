import pytest

from pat_hf.arguments import parse_arguments


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
