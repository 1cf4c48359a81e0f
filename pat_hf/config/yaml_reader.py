"""Reading `--config` YAML files: a path or the name of a shipped recipe, with `base:` chains.

The one reader of config files: the argument parser and the overridden-flag check both go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "base"
PACKAGED_CONFIGS = Path(__file__).parent / "recipes"
def packaged_config_names() -> list[str]:
    return sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for p in PACKAGED_CONFIGS.rglob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML file, or the name of a config shipped inside the package (`cifar/cnn`, `smoke`,
    `configs/cifar/cnn.yaml`), so that a pip-installed pat-hf finds its recipes from any directory."""
    if Path(path).is_file():
        return Path(path)
    name = path.removeprefix("configs/")
    packaged = PACKAGED_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config not found: {path} is neither a file nor a shipped config "
                            f"(e.g. {', '.join(packaged_config_names()[:4])}; see pat_hf/config/recipes)")


def _config_chain(path: str, _included_from: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(file, its keys) of a YAML file and the files it extends through `base: OTHER.yaml` (relative to the
    file; bases may chain), the farthest base first."""
    config_path = resolve_config_path(path) if not _included_from else Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    base = config.pop(BASE_KEY, None)
    if base is None:
        return [(path, config)]
    chain = (*_included_from, config_path.resolve())
    base_path = (config_path.parent / str(base)).resolve()
    if base_path in chain:
        raise ValueError(f"{path}: 'base: {base}' includes a file that includes it")
    return [*_config_chain(str(base_path), chain), (path, config)]
