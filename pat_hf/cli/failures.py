"""The failure contract of every pat-hf command, in one place.

A command ends with exit status 0 when it did its work, 1 when it failed (one line on stderr: what is wrong and
what to do), 2 when its arguments are wrong (argparse's line, or ours), and 130 when interrupted (Ctrl-C at any
moment, the imports included). `--debug` anywhere on the command line prints the traceback instead of the line.
In a distributed run (`accelerate launch`), an argument error is printed by the first process only, since every
process reads the same command line; any other error is printed by each process that meets it, with its rank.

This module imports nothing heavy, so that a console script reaches `run_command` before torch is loaded.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from pat_hf.config.checks import UsageError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "UsageError", "advise_on_interrupt", "run_command"]

# What the interrupt line adds once the running command knows what is on disk (pat-hf-train: its output folder).
_interrupt_advice: Callable[[], str] | None = None


def advise_on_interrupt(advice: Callable[[], str] | None) -> None:
    """From now on, until the command ends, the one line of an interrupt ends with `advice()`, called at that
    moment so that it can say what there is to continue from."""
    global _interrupt_advice
    _interrupt_advice = advice


def _interrupt_line(prog: str) -> str:
    advice = ""
    if _interrupt_advice is not None:
        try:
            advice = _interrupt_advice()
        except Exception:  # noqa: BLE001  (the interrupt's own line must still be printed)
            advice = ""
    return f"{prog}: interrupted{'; ' + advice if advice else ''}"


def wants_traceback(argv: list[str]) -> bool:
    """Whether `--debug` (or `--debug true`) is on the command line: read before and whatever the parsing does,
    as an error can come before the arguments are parsed."""
    for position, arg in enumerate(argv):
        if arg == "--debug":
            following = argv[position + 1] if position + 1 < len(argv) else ""
            return following.lower() not in ("false", "0", "no")
        if arg.startswith("--debug="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    return False


def error_line(error: BaseException) -> str:
    """An error as one line: our own errors say what is wrong and what to do; another kind is named, with the
    way to its traceback."""
    message = " ".join(str(error).split()) or repr(error)
    if isinstance(error, ValueError | OSError) or getattr(error, "says_what_to_do", False):
        return message[:2000]
    return f"{type(error).__name__}: {message[:2000]} (--debug shows the traceback)"


def _torch_distributed() -> Any | None:
    """torch.distributed when a process group is running (torch is only consulted once it is loaded)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


def distributed_rank() -> int | None:
    """This process's rank in a distributed run of several processes, else None."""
    dist = _torch_distributed()
    if dist is not None and dist.get_world_size() > 1:
        return dist.get_rank()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return int(os.environ.get("RANK", "0")) if launched else None


def distributed_error_line(error: BaseException, rank: int) -> str:
    """One process's error in a distributed run, named by its rank; a collective that timed out is the symptom
    of another process that failed or hung, whose own error (if any) is on its own line."""
    if isinstance(error, RuntimeError) and any(word in str(error).lower() for word in ("timed out", "timeout")):
        return (f"process {rank}: no answer from the other processes within --ddp_timeout (one of them failed or "
                f"hung): {error_line(error)}")
    return f"process {rank}: {error_line(error)}"


def leave(status: int, message: str | None = None, as_program: bool = False) -> None:
    """End the command with `status` (0: return to the caller), printing `message` on stderr. Under
    torch.distributed the interpreter's teardown is skipped: with the process group alive it can hang or abort
    after all work is done, and the other processes see this one leave."""
    if message:
        print(message, file=sys.stderr)
    if status == EXIT_INTERRUPTED and as_program:
        # An interrupt can land inside an import or a C call, after which the interpreter's own shutdown may
        # still end the process by SIGINT; the finally blocks have run, so the program leaves with its status.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    dist = _torch_distributed()
    if dist is not None:
        if status == 0:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    if status:
        raise SystemExit(status)


def _main_of(target: str | Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def run_command(prog: str, target: str | Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a command's `main(argv)` under the contract above. `target` is the function or "module:function",
    imported here so that Ctrl-C during the imports is met too."""
    as_program = argv is None  # the process's own command line, not a call from other Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    advise_on_interrupt(None)
    try:
        _main_of(target)(argv)
    except KeyboardInterrupt:
        leave(EXIT_INTERRUPTED, _interrupt_line(prog), as_program=as_program)
    except SystemExit as exit_request:
        # argparse (its own one line, or --help) and commands that end themselves keep their status.
        code = exit_request.code
        if isinstance(code, str):
            leave(EXIT_FAILURE, code)
        leave(code or 0)
    except Exception as error:  # every failure ends in one line, not a traceback
        if wants_traceback(argv):
            traceback.print_exc()
            leave(EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE)
        rank = distributed_rank()
        status = EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE
        if rank is None:
            leave(status, f"{prog}: {error_line(error)}")
        elif isinstance(error, UsageError):
            leave(status, f"{prog}: {error_line(error)}" if rank == 0 else None)
        else:
            leave(status, f"{prog}: {distributed_error_line(error, rank)}")
    leave(0)
