"""Upload an exported model folder to the Hugging Face Hub (`maskcma push`).

`push_to_hub` creates the repository when it does not exist (`HfApi.create_repo(exist_ok=True)`), creates the
branch when a revision other than `main` is asked for, and uploads the whole folder in one commit
(`HfApi.upload_folder`). Every Hub error is turned into a `HubPushError` whose message names the repository and
says what to do (log in, check the repo id, ask for write access).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = ["HubPushError", "PushResult", "check_export_folder", "push_to_hub"]

# what `maskcma export` always writes; a folder without them is not an export
REQUIRED_EXPORT_FILES = ("config.json", "README.md")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
LOGIN_HINT = "log in with `hf auth login` (or set the HF_TOKEN environment variable, or pass --token)"


class HubPushError(RuntimeError):
    """The upload could not be done; the message names the repository and the fix."""


@dataclass(frozen=True)
class PushResult:
    """Where the folder went.

    Args:
        repo_url (`str`): URL of the repository.
        commit_url (`str`): URL of the upload commit.
        commit_oid (`str`): its git hash.
        revision (`str`): the branch written to.
        num_files (`int`): files uploaded.
    """

    repo_url: str
    commit_url: str
    commit_oid: str
    revision: str
    num_files: int


def check_export_folder(folder: str | os.PathLike) -> list[Path]:
    """Check that `folder` is an export of `maskcma export` and list its files.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: it is a file.
        ValueError: config, model card or weights are missing.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; write it first with `maskcma export --output {folder}`")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; `maskcma push` uploads the folder written by `maskcma export`")
    missing = [name for name in REQUIRED_EXPORT_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ValueError(
            f"{folder} is not an export of `maskcma export`: missing {', '.join(missing)}; run "
            f"`maskcma export --model TRAINED --output {folder}` first"
        )
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _describe_http_error(error: HfHubHTTPError, repo_id: str, endpoint: str, stage: str) -> str:
    status = error.response.status_code if error.response is not None else None
    where = f"{stage} {repo_id!r} on {endpoint}"
    if isinstance(error, GatedRepoError) or status == 403:
        return (
            f"{where} was refused (403 Forbidden): your token cannot write to {repo_id!r}. Use a token with write "
            f"access to that namespace (https://huggingface.co/settings/tokens) and {LOGIN_HINT}"
        )
    if status == 401:
        return f"{where} was refused (401 Unauthorized): the token is missing, invalid or expired; {LOGIN_HINT}"
    if isinstance(error, RevisionNotFoundError):
        return f"{where} failed: the branch does not exist ({error.server_message or error})"
    if isinstance(error, RepositoryNotFoundError) or status == 404:
        return (
            f"{where} failed (404): the repository {repo_id!r} does not exist or your token cannot see it. Check the "
            f"namespace in --repo-id (your user name or an organisation you belong to) and {LOGIN_HINT}"
        )
    detail = error.server_message or str(error).splitlines()[0]
    return f"{where} failed (HTTP {status}): {detail}"


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload an export folder to the Hub in one commit.

    Args:
        folder: the folder of `maskcma export`.
        repo_id: `namespace/name` of the model repository (created when missing).
        private: create the repository as private (ignored when it exists).
        revision: branch to commit to (created from `main` when missing); default `main`.
        commit_message: default `"Upload MaskCMA model"`.
        token: Hub token; default the logged-in token (`HF_TOKEN` or `hf auth login`).
        endpoint: Hub URL; default `HF_ENDPOINT` or https://huggingface.co.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: the folder is not an export, or the repo id is invalid.
        HubPushError: no token, offline mode, or the Hub refused a request (message says why and what to do).
    """
    files = check_export_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--repo-id {repo_id!r} is not a valid Hub repository id: {error}") from error
    if "/" not in repo_id:
        raise ValueError(f"--repo-id {repo_id!r} needs a namespace: use 'your-user-name/{repo_id}' or 'org/{repo_id}'")
    token = token or get_token()
    if not token:
        raise HubPushError(f"no Hugging Face token found to push to {repo_id!r}: {LOGIN_HINT}")
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(
            f"cannot push to {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE and retry"
        )
    revision = revision or constants.DEFAULT_REVISION
    stage = "creating the repository"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision != constants.DEFAULT_REVISION:
            stage = f"creating branch {revision!r} of"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        stage = "uploading to"
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload MaskCMA model",
        )
    except OfflineModeIsEnabled as error:
        raise HubPushError(f"cannot push to {repo_id!r}: {error}") from error
    except HfHubHTTPError as error:
        raise HubPushError(_describe_http_error(error, repo_id, endpoint, stage)) from error
    return PushResult(
        repo_url=str(repo_url),
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
        revision=revision,
        num_files=len(files),
    )
