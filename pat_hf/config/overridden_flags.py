"""TrainingArguments flags that pat-hf's trainer does not use, because the reference's recipe replaces them.

The optimizer and the learning-rate schedule are timm's, the loss is the distiller's, the training order is the
reference's per-epoch shuffle and only the exported student is pushed. Giving one of these flags, on the command
line or as a key of the --config YAML, is an error that names what to use instead, not a setting silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import yaml

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
_CONFIG_FLAGS = ("-c", "--config")
_BASE_KEY = "base"


def _normalised(name: str) -> str:
    return name.lstrip("-").split("=", 1)[0].replace("-", "_")


def _config_argument(argv: list[str]) -> str | None:
    for position, token in enumerate(argv):
        if token in _CONFIG_FLAGS and position + 1 < len(argv):
            return argv[position + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _config_keys(path: Path) -> dict[str, Path]:
    """Every key of a YAML config file and of the files it extends through `base:`, with the file setting it.
    Shipped config names (not paths) and unreadable files are left to the config reader to resolve or reject."""
    keys: dict[str, Path] = {}
    seen: set[Path] = set()
    while path.is_file() and path.resolve() not in seen:
        seen.add(path.resolve())
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            break
        for key in config:
            keys.setdefault(_normalised(str(key)), path)
        base = config.get(_BASE_KEY)
        if base is None:
            break
        path = path.parent / str(base)
    return keys


def reject_overridden_flags(argv: list[str]) -> None:
    """Raise ValueError for the first TrainingArguments flag in `argv`, or key in its --config, that pat-hf
    overrides with the reference's recipe."""
    given = {_normalised(token): f"--{_normalised(token)}" for token in argv if token.startswith("--")}
    config = _config_argument(argv)
    if config:
        given.update({key: f"key {key!r} in {path}" for key, path in _config_keys(Path(config)).items()
                      if key not in given})
    for name, (why, instead) in OVERRIDDEN_FLAGS.items():
        if name in given:
            raise ValueError(f"{given[name]} is not used by pat-hf ({why}); {instead}")
