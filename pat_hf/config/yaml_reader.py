"""Reading `--config` YAML files: a path or the name of a shipped recipe, with `base:` chains.

The one reader of config files: the argument parser and the overridden-flag check both go through it, so a
shipped recipe given by name, a `base:` cycle or a file that is not valid YAML is met the same way by both.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from pat_hf.config.checks import UsageError, UsageFileNotFoundError

BASE_KEY = "base"
CONFIG_FLAGS = ("-c", "--config")
SHIPPED_RECIPES = Path(__file__).parent / "recipes"


def config_argument(argv: list[str]) -> str:
    """The `--config` value of a command line ('' when none is given), found before anything else is parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(*CONFIG_FLAGS, default="")
    return parser.parse_known_args(argv)[0].config


def shipped_recipe_names() -> list[str]:
    return sorted(str(p.relative_to(SHIPPED_RECIPES).with_suffix("")) for p in SHIPPED_RECIPES.rglob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML file, or the name of a recipe shipped inside the package (`cifar/cnn`, `smoke`,
    `configs/cifar/cnn.yaml`), so that a pip-installed pat-hf finds its recipes from any directory."""
    if Path(path).is_file():
        return Path(path)
    name = path.removeprefix("configs/")
    shipped = SHIPPED_RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    raise UsageFileNotFoundError(f"config not found: {path} is neither a file nor a shipped config "
                            f"(e.g. {', '.join(shipped_recipe_names()[:4])}; see pat_hf/config/recipes)")


def _read_mapping(path: Path, shown: str) -> dict[str, Any]:
    """The keys of one YAML file; what is wrong with it as one line naming the file (and the line)."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{shown} is not a UTF-8 text file; save it as UTF-8 YAML") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"{shown} is not valid YAML{where}: {problem} (indent with spaces, write key: value)") \
            from None
    except OSError as error:
        raise UsageError(f"cannot read {shown}: {error.strerror or error}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"{shown} must hold a mapping of option: value, not a {type(config).__name__}")
    return config


def config_chain(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(file, its keys) of a YAML file or shipped recipe and of the files it extends through `base: OTHER.yaml`
    (relative to the file; bases may chain), the farthest base first. A chain that comes back to one of its
    files is an error."""
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: list[Path] = []
    shown, config_path = path, resolve_config_path(path)
    while True:
        config = _read_mapping(config_path, shown)
        seen.append(config_path.resolve())
        base = config.pop(BASE_KEY, None)
        chain.insert(0, (shown, config))
        if base is None:
            return chain
        base_path = (config_path.parent / str(base)).resolve()
        if base_path in seen:
            raise UsageError(f"{shown}: 'base: {base}' includes a file that includes it")
        if not base_path.is_file():
            raise UsageFileNotFoundError(f"{shown}: 'base: {base}' names no file ({base_path} does not exist)")
        shown, config_path = str(base_path), base_path
