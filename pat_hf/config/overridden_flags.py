"""TrainingArguments flags that pat-hf's trainer does not use, because the reference's recipe replaces them.

The optimizer and the learning-rate schedule are timm's, the loss is the distiller's, the training order is the
reference's per-epoch shuffle and only the exported student is pushed. Giving one of these flags, on the command
line or as a key of the --config YAML, is an error that names what to use instead, not a setting silently ignored.
"""

from __future__ import annotations

from pat_hf.config.checks import UsageError
from pat_hf.config.yaml_reader import config_chain

_OPTIMIZER = "it trains with timm's optimizer"
_SCHEDULE = "it follows timm's learning-rate schedule, stepped per epoch"
_PUSH = "it pushes the exported student once, after training, never checkpoints"
# flag (field name) -> (why it is not used, what to use instead)
OVERRIDDEN_FLAGS: dict[str, tuple[str, str]] = {
    "optim": (_OPTIMIZER, "use --opt NAME, e.g. --opt adamw"),
    "optim_args": (_OPTIMIZER, "use --opt-eps, --opt-betas and --momentum"),
    "optim_target_modules": (_OPTIMIZER, "it optimizes the student and the distiller's modules; drop the flag"),
    "adam_beta1": (_OPTIMIZER, "use --opt-betas BETA1 BETA2"),
    "adam_beta2": (_OPTIMIZER, "use --opt-betas BETA1 BETA2"),
    "adam_epsilon": (_OPTIMIZER, "use --opt-eps EPS"),
    "lr_scheduler_type": (_SCHEDULE, "use --sched cosine|step|tanh|poly|constant"),
    "lr_scheduler_kwargs": (_SCHEDULE, "use --min-lr, --warmup-lr, --decay-epochs, --decay-rate, --cooldown-epochs"),
    "warmup_steps": (_SCHEDULE, "use --warmup-epochs N and --warmup-lr LR"),
    "warmup_ratio": (_SCHEDULE, "use --warmup-epochs N and --warmup-lr LR"),
    "label_smoothing_factor": ("the distiller computes the loss", "use --smoothing EPS"),
    "train_sampling_strategy": ("it shuffles once per epoch as the reference does", "drop the flag"),
    "hub_strategy": (_PUSH, "drop the flag"),
    "hub_always_push": (_PUSH, "drop the flag"),
}


def _normalised(name: str) -> str:
    return name.lstrip("-").split("=", 1)[0].replace("-", "_")


def reject_overridden_flags(argv: list[str], config_path: str = "") -> None:
    """Raise UsageError for the first TrainingArguments flag in `argv`, or key in the `config_path` YAML (a file
    or a shipped recipe, with its `base:` chain), that pat-hf overrides with the reference's recipe."""
    given = {_normalised(token): f"--{_normalised(token)}" for token in argv if token.startswith("--")}
    if config_path:
        for file, config in reversed(config_chain(config_path)):
            given |= {_normalised(str(key)): f"key {_normalised(str(key))!r} in {file}" for key in config
                      if _normalised(str(key)) not in given}
    for name, (why, instead) in OVERRIDDEN_FLAGS.items():
        if name in given:
            raise UsageError(f"{given[name]} is not used by pat-hf ({why}); {instead}")
