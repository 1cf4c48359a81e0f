"""Publishing an exported student on the Hub: the repository created and write access checked before
training, then one commit with a message naming the student, teacher, distiller and top-1.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from pat_hf.config.arguments import DistillTrainingArguments
from pat_hf.export.card import CARD_RUN_KEY, with_repo_usage


class HubPushError(RuntimeError):
    """The Hub refused to create, or to let us write to, the student's repository."""

    # Its message names what to change: commands print it as it is (pat_hf/cli/failures.py).
    says_what_to_do = True


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def prepare_repo(repo_id: str, *, private: bool | None = None, token: str | None = None,
                 revision: str | None = None, token_flag: str = "--hub_token",
                 repo_flag: str = "--hub_model_id") -> str:
    """Create the model repository (and branch) if missing and check that the token may write to it, before
    any training; returns the repository id the Hub resolved (`RepoUrl.repo_id`). `token_flag` and `repo_flag`:
    how the calling command takes the token and the repository id, for its message."""
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.auth_check(repo_id, write=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except (OSError, ValueError) as error:  # HTTP errors, no token, offline mode, a malformed repo id
        raise HubPushError(f"cannot push to the Hub repository {repo_id!r}: {_first_line(error)} (log in with "
                           f"`hf auth login` or pass {token_flag} with a write token, and check {repo_flag})"
                           ) from None
    return repo_id


def commit_message(card: ModelCard) -> str:
    """`<student> distilled from <teacher> with <distiller> (top-1 X on DATASET)`, from the card's metadata."""
    run = card.data.get(CARD_RUN_KEY) or {}
    top1 = next((r for r in card.data.eval_results or [] if r.metric_type == "accuracy"), None)
    score = f" (top-1 {top1.metric_value:.2f} on {top1.dataset_name})" if top1 else ""
    return (f"Add {run.get('student', 'student')} distilled from {run.get('teacher') or 'no teacher'} "
            f"with {run.get('distiller', 'pat-hf')}{score}")


def push_student(directory: str | Path, repo_id: str, *, token: str | None = None, revision: str | None = None,
                 create_pr: bool = False) -> str:
    """Upload an exported student folder (not a training checkpoint) to a prepared Hub repository; its card's
    usage snippets are rewritten for `repo_id` first. Returns the commit's (or the pull request's) URL."""
    readme = Path(directory) / "README.md"
    card = with_repo_usage(ModelCard.load(readme), repo_id)
    card.save(readme)
    try:
        commit = HfApi(token=token).upload_folder(
            repo_id=repo_id, folder_path=str(directory), commit_message=commit_message(card), revision=revision,
            create_pr=create_pr)
    except (OSError, ValueError) as error:  # HTTP errors, a lost connection, offline mode
        raise HubPushError(f"could not upload {directory} to the Hub repository {repo_id!r}: {_first_line(error)}; "
                           f"nothing was committed (an upload is one commit): push it again with pat-hf-push "
                           f"{directory} {repo_id}") from None
    return commit.pr_url or commit.commit_url


def prepare_push(training: DistillTrainingArguments) -> str | None:
    """With --push-to-hub: the Hub repository, created and checked for write access before any training."""
    if not training.push_student_to_hub or training.process_index != 0:
        return None
    repo_id = training.hub_model_id or os.path.basename(os.path.normpath(training.output_dir))
    return prepare_repo(repo_id, private=training.hub_private_repo, token=training.hub_token,
                        revision=training.hub_revision)
