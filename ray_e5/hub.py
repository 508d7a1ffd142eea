"""Uploads to the Hugging Face Hub: one folder, through ``huggingface_hub``'s HfApi (its retries, LFS, auth).

The token is ``HF_TOKEN`` or the user's ``huggingface-cli login`` (HfApi finds either itself); nothing here reads
or prints it. ``huggingface_hub`` is imported inside the function, so ``ray-e5 --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def push_folder(folder: str | Path, repo_id: str, repo_type: str = "model", private: bool | None = None,
                allow_patterns: Sequence[str] | None = None, commit_message: str | None = None) -> str:
    """Create ``repo_id`` when it does not exist and upload ``folder`` (its README.md is the card the Hub shows);
    returns the repository's URL. ``allow_patterns`` keeps a folder's working files (journals, logs) off the Hub."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md (the card): nothing to push")
    api = HfApi()
    repo = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                      allow_patterns=list(allow_patterns) if allow_patterns else None,
                      commit_message=commit_message or f"ray-e5: upload {folder.name}")
    return str(getattr(repo, "url", repo))
