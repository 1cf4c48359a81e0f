"""Command-line and YAML arguments: flags over `--config` values over built-in defaults.

`--config FILE.yaml` supplies defaults that flags override; its keys are the reference's (`batch_size`, `lr`,
`weight_decay`, ...) or ours. An unknown key is an error, and so is a key or flag of another distiller than
the run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import HfArgumentParser

from pat_hf.config.arguments import (
    DataArguments,
    DistillTrainingArguments,
    ModelArguments,
    RecipeArguments,
    RunArguments,
)
from pat_hf.config.checks import InvalidValue, OneLineErrors, UsageError
from pat_hf.config.overridden_flags import reject_overridden_flags
from pat_hf.config.yaml_reader import CONFIG_FLAGS, config_argument, config_chain
from pat_hf.distillers import DISTILLERS, DistillArguments, Distiller, get_distiller_class


def _dataclass_types(distiller_cls: type[Distiller]) -> list[type]:
    """The sections a run of `distiller_cls` parses: the shared ones and that distiller's own hyper-parameters."""
    own = [distiller_cls.Arguments] if distiller_cls.Arguments is not None else []
    return [ModelArguments, DataArguments, RecipeArguments, DistillArguments, *own, DistillTrainingArguments]


def _key_names(f: dataclasses.Field) -> list[str]:
    """The names a YAML key may use for a field: its name and its `--` aliases, in underscores."""
    return [f.name, *(alias[2:].replace("-", "_") for alias in f.metadata.get("aliases", [])
                      if alias.startswith("--"))]


def _key_to_dest(types: list[type]) -> dict[str, str]:
    """Every name a YAML key may use (field names, dashed names, aliases) -> the field it sets."""
    return {name: f.name for dataclass_type in types for f in dataclasses.fields(dataclass_type) if f.init
            for name in _key_names(f)}


def _owners_of_other_options(distiller_cls: type[Distiller]) -> dict[str, str]:
    """Option names (YAML keys in underscores, flags as typed) of the other distillers -> the distiller's name."""
    owners = {}
    for name, cls in DISTILLERS.items():
        if cls.Arguments is None or cls.Arguments is distiller_cls.Arguments:
            continue
        for f in dataclasses.fields(cls.Arguments):
            for key in _key_names(f):
                owners |= {key: name, f"--{key}": name, f"--{key.replace('_', '-')}": name,
                           f"--no_{key}": name, f"--no-{key.replace('_', '-')}": name}
    return owners


def _belongs_elsewhere(option: str, owner: str, distiller: str) -> str:
    return f"{option} belongs to --distiller {owner}, not {distiller}"


class ConfigValue(NamedTuple):
    """A value a --config file sets: under which key, in which file (of its `base:` chain)."""

    key: str
    value: Any
    file: str


def read_config(path: str, types: list[type], distiller: str = "") -> dict[str, ConfigValue]:
    """The defaults a YAML file sets, by field name, its own keys overriding its bases'. `distiller`: the run's,
    to name the distiller a key of another one belongs to."""
    destinations = _key_to_dest(types)
    others = _owners_of_other_options(get_distiller_class(distiller)) if distiller else {}
    defaults = {}
    for file, config in config_chain(path):
        for key, value in config.items():
            normalised = str(key).replace("-", "_")
            if normalised in others:
                raise UsageError(_belongs_elsewhere(f"key {key!r} in {file}", others[normalised], distiller))
            if normalised not in destinations:
                raise UsageError(f"unknown key {key!r} in {file}; run with --help for the accepted names")
            defaults[destinations[normalised]] = ConfigValue(str(key), value, file)
    return defaults


def _typed_value(action: argparse.Action, value: Any) -> Any:
    """`value` converted by the option's type as argparse converts a typed flag; TypeError/ValueError if it
    cannot be."""
    if value is None or action.type is None:
        return value
    if action.type is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise ValueError(value)
    converted = action.type(value if isinstance(value, str) else str(value) if action.type is str else value)
    if action.choices is not None and converted not in action.choices:
        raise ValueError(value)
    return converted


def _typed_config_values(parser: HfArgumentParser, defaults: dict[str, ConfigValue]) -> dict[str, Any]:
    """The YAML values with the types of their options: a value of the wrong type is an error naming its key
    and file, before anything is built."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for dest, (key, value, file) in defaults.items():
        action = actions[dest]
        takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        expected = {"string_to_bool": "true or false"}.get(getattr(action.type, "__name__", ""),
                                                            getattr(action.type, "__name__", "a value"))
        try:
            if takes_list:
                typed[dest] = [_typed_value(action, v) for v in (value if isinstance(value, list) else [value])]
            elif isinstance(value, dict) and action.type is str:
                typed[dest] = value  # a JSON-object option (--model-kwargs) given as a YAML mapping
            elif isinstance(value, list | dict):
                raise ValueError(value)
            else:
                typed[dest] = _typed_value(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            what = f"a list of {expected}" if takes_list else expected
            choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
            raise UsageError(f"{file}: {key} takes {what}{choices}, got {value!r}") from None
    return typed


def _distiller_name(argv: list[str], config_path: str) -> str:
    """The run's distiller, from --distiller or else --config, before anything else is parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--distiller", default=None)
    given = parser.parse_known_args(argv)[0].distiller
    if given is not None:
        return given
    from_config = [config["distiller"] for _, config in config_chain(config_path) if "distiller" in config] \
        if config_path else []
    return from_config[-1] if from_config else DistillArguments.distiller


def _set_mixed_precision(values: dict[str, Any]) -> None:
    """--amp: fp16 (or --amp-dtype bfloat16) autocast on CUDA, bf16 autocast on the CPU."""
    if values["amp_dtype"] not in ("float16", "bfloat16"):
        raise UsageError(f"--amp-dtype must be float16 or bfloat16, got {values['amp_dtype']!r}")
    on_cuda = torch.cuda.is_available() and not values["use_cpu"]
    use_fp16 = on_cuda and values["amp_dtype"] == "float16"
    values["fp16"], values["bf16"] = use_fp16, not use_fp16
    if not on_cuda:
        # TrainingArguments accepts bf16 without a GPU only when told to run on the CPU.
        values["use_cpu"] = True


class OneLineErrorParser(OneLineErrors, HfArgumentParser):
    """HfArgumentParser whose errors are one line on stderr (no usage block), exit status 2 as argparse's."""


def _build_parser(types: list[type]) -> HfArgumentParser:
    parser = OneLineErrorParser(types, prog="pat-hf-train", epilog="Each distiller has options of its own: add "
                                                                   "--distiller NAME to --help to list them.")
    parser.add_argument(*CONFIG_FLAGS, default="", help="YAML file or shipped recipe name of default values "
                                                     "(reference keys)")
    parser._option_string_actions["--distiller"].help = f"distillation method: {' | '.join(DISTILLERS)}"
    return parser


@dataclass
class CommandLine:
    """A command line read against its distiller's options, before any argument object is built."""

    distiller_cls: type[Distiller]
    types: list[type]
    values: dict[str, Any]
    # The values that came from the --config file (not overridden by a flag), by field name.
    from_config: dict[str, ConfigValue] = field(default_factory=dict)

    def build(self) -> RunArguments:
        """The argument objects. Building `TrainingArguments` sets up transformers' devices (and, in a
        distributed run, its process group): a run that must shape that starts it before calling this.
        A value out of range is a UsageError naming its flag, or its YAML key and file."""
        try:
            instances = [t(**{f.name: self.values[f.name] for f in dataclasses.fields(t) if f.init})
                         for t in self.types]
        except InvalidValue as error:
            origin = self.from_config.get(error.dest)
            if origin is None:
                raise
            raise UsageError(error.naming(f"key {origin.key!r} in {origin.file}")) from error
        except UsageError:
            raise
        except ValueError as error:  # the checks of transformers' TrainingArguments and of the distillers
            raise UsageError(str(error)) from error
        model, data, recipe, distill, *own, training = instances
        return RunArguments(model, data, recipe, distill, own[0] if own else None, training)


_NOT_GIVEN = object()


def _given_as_flags(parser: HfArgumentParser, argv: list[str], dests: list[str]) -> set[str]:
    """Which of `dests` the command line sets with a flag (parsed again with a marker in place of the defaults:
    argparse leaves a value it finds in the namespace unless a flag sets it)."""
    namespace = argparse.Namespace(**dict.fromkeys(dests, _NOT_GIVEN))
    parsed = vars(parser.parse_known_args(argv, namespace=namespace)[0])
    return {dest for dest in dests if parsed[dest] is not _NOT_GIVEN}


def read_command_line(argv: list[str] | None = None) -> CommandLine:
    """Flags over YAML defaults over built-in defaults, as the reference's train.py reads them. The distiller is
    found first: only its own hyper-parameters are accepted, and every value is checked as it is read."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = config_argument(argv)
    reject_overridden_flags(argv, config_path)
    distiller = _distiller_name(argv, config_path)
    distiller_cls = get_distiller_class(distiller)
    types = _dataclass_types(distiller_cls)
    parser = _build_parser(types)
    defaults: dict[str, ConfigValue] = {}
    if config_path:
        defaults = read_config(config_path, types, distiller)
        if "max_grad_norm" in defaults and defaults["max_grad_norm"].value is None:
            defaults["max_grad_norm"] = defaults["max_grad_norm"]._replace(value=0.0)
        parser.set_defaults(**_typed_config_values(parser, defaults))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        others = _owners_of_other_options(distiller_cls)
        for option in (arg.split("=", 1)[0] for arg in unknown):
            if option in others:
                parser.error(_belongs_elsewhere(option, others[option], distiller))
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    if values["amp"]:
        _set_mixed_precision(values)
    flags = _given_as_flags(parser, argv, list(defaults))
    return CommandLine(distiller_cls, types, values, {d: v for d, v in defaults.items() if d not in flags})


def parse_arguments(argv: list[str] | None = None) -> RunArguments:
    """The run's arguments from a command line (`read_command_line`, then `CommandLine.build`)."""
    return read_command_line(argv).build()
