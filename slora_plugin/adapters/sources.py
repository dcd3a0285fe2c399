"""Where an adapter name points: the adapter directory first, then the Hugging Face cache.

Shared by the store (engine side) and the resolver (API-server side) so both agree on what a
name means and on its stable integer id.
"""

from __future__ import annotations

import os

from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.hub import locate_hub
from slora_plugin.adapters.index import AdapterIndex, IdRegistry, check_name
from slora_plugin.adapters.peft_format import CONFIG_NAME


#: How to name an adapter in a `LoRARequest`, for the error of a `lora_path` that is neither.
LORA_PATH_HINT = ("Give lora_path as an adapter directory (absolute, or relative to the working "
                  "directory) or as the name of an adapter in slora.adapter_dir (e.g. 'org/name'; "
                  "slora_plugin.adapters.resolver.lora_request(name, adapter_dir) builds the "
                  "request)")


class AdapterSources:
    """Name -> real directory path; `adapter_dir` may be None (Hub ids and absolute paths only)."""

    def __init__(self, adapter_dir: str | None, hf_cache_dir: str | None = None,
                 hub_download: bool = False) -> None:
        self.index = AdapterIndex(adapter_dir) if adapter_dir else None
        self.hf_cache_dir, self.hub_download = hf_cache_dir, hub_download
        self._ids = self.index.ids if self.index else IdRegistry(None)

    def locate(self, name_or_path: str, allow_absolute: bool = True) -> tuple[str, str]:
        """(name, real directory path). When `allow_absolute` (vLLM's `lora_path`, never an
        HTTP client's name), paths are taken as they are: absolute ones, and relative ones that
        lead to an adapter directory from the working directory (as stock vLLM reads a relative
        `lora_path`); anything else is a name, confined to the directory."""
        if allow_absolute and isinstance(name_or_path, str) and (
                os.path.isabs(name_or_path) or os.path.isfile(os.path.join(name_or_path, CONFIG_NAME))):
            path = os.path.realpath(name_or_path)
            if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
                raise AdapterNotFoundError(name_or_path, CONFIG_NAME, f"not found in {path}")
            name = (self.index.name_of(path) if self.index else None) or name_or_path
            return name, path
        try:
            check_name(name_or_path)
        except AdapterError as e:
            if not allow_absolute:
                raise
            raise AdapterError(e.adapter, e.file, f"{e.reason}; it is not an adapter directory "
                                                  f"relative to the working directory {os.getcwd()} "
                                                  f"either. {LORA_PATH_HINT}") from None
        not_found: AdapterNotFoundError | None = None
        if self.index is not None:
            try:
                return name_or_path, self.index.locate(name_or_path)
            except AdapterNotFoundError as e:
                not_found = e
        path = locate_hub(name_or_path, self.hf_cache_dir, self.hub_download)
        if path is not None:
            return name_or_path, path
        raise not_found or AdapterNotFoundError(
            name_or_path, None, "not found: no adapter directory is configured (slora.adapter_dir) "
                                "and it is not in the Hugging Face cache")

    def lora_int_id(self, name: str) -> int:
        """A positive id, stable per name (see IdRegistry)."""
        if not isinstance(name, str) or not name:
            raise AdapterError(str(name), None, "an adapter name must be a non-empty string")
        return self._ids.get(name)
