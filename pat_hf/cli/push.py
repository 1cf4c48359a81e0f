"""Upload an exported student (OUTPUT_DIR/student) to a Hub model repository: the `pat-hf-push` console script.

    pat-hf-push runs/x/student USER/NAME [--private] [--revision BRANCH] [--create-pr] [--token TOKEN]

The repository (and branch) is created if missing and the token's write access checked before anything is
uploaded; the model card's usage snippets are rewritten for the repository id the Hub resolved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pat_hf.cli import push_command
from pat_hf.config.checks import OneLineArgumentParser
from pat_hf.export.hub import prepare_repo, push_student

EXPORTED_FILES = ("config.json", "model.safetensors", "README.md")


def parse_push_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="pat-hf-push", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="an exported student folder (OUTPUT_DIR/student)")
    parser.add_argument("repo_id", help="USER/NAME, or NAME under the token's own namespace")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN)")
    args = parser.parse_args(argv)
    missing = [name for name in EXPORTED_FILES if not (args.directory / name).is_file()]
    if missing:
        parser.error(f"{args.directory} is not an exported student (no {', '.join(missing)}); pass the "
                     f"student/ folder of a pat-hf run")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_push_arguments(sys.argv[1:] if argv is None else argv)
    repo_id = prepare_repo(args.repo_id, private=args.private, token=args.token, revision=args.revision,
                           token_flag="--token", repo_flag="the repository id (USER/NAME)")
    url = push_student(args.directory, repo_id, token=args.token, revision=args.revision, create_pr=args.create_pr)
    print(f"pat-hf: pushed {args.directory} to {url}")
    return url


if __name__ == "__main__":
    push_command()
