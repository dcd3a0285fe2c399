"""Adapters named by Hugging Face Hub id (`org/name`), served from the local HF cache.

Used only for names that are not in the adapter directory. The cache is read through
`huggingface_hub` itself (`snapshot_download(local_files_only=True)`), so the standard cache
layout, `HF_HUB_CACHE` / `HF_HOME` and revisions behave as in every other HF tool. Downloading a
missing adapter is opt-in (`allow_download`): a request must not trigger network traffic unless
the operator asked for it.
"""

from __future__ import annotations

import os

from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME]


def is_hub_id(name: str) -> bool:
    """`org/name` shaped (two components), as the Hub accepts it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def locate_hub(repo_id: str, cache_dir: str | None = None, allow_download: bool = False) -> str | None:
    """The snapshot directory of `repo_id` holding an adapter config, or None if it is not
    cached (and not downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not is_hub_id(repo_id):
        return None
    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True,
                                 allow_patterns=_PATTERNS)
    except LocalEntryNotFoundError:
        if not allow_download:
            return None
        path = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=_PATTERNS)
    path = os.path.realpath(path)
    return path if os.path.isfile(os.path.join(path, CONFIG_NAME)) else None
