"""Where an adapter name points: the adapter directory first, then the Hugging Face cache.

Shared by the store (engine side) and the resolver (API-server side) so both agree on what a
name means and on its stable integer id.
"""

from __future__ import annotations

import os

from slora_plugin.adapters.compressed import split_path
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
        """(name, real directory path). A name is looked up in the directory (confined to it),
        then in the Hugging Face cache. When `allow_absolute` (vLLM's `lora_path`, never an HTTP
        client's name), an absolute path is taken as it is, and a relative one that is no
        adapter of the directory but leads to an adapter directory from the working directory is
        read from there, as stock vLLM reads a relative `lora_path`."""
        if allow_absolute and isinstance(name_or_path, str) and os.path.isabs(name_or_path):
            return self._at_path(name_or_path)
        try:
            check_name(name_or_path)
        except AdapterError as e:
            if not allow_absolute:
                raise
            if _leads_to_adapter(name_or_path):
                return self._at_path(name_or_path)
            raise AdapterError(e.adapter, e.file, f"{e.reason}; it is not an adapter directory "
                                                  f"relative to the working directory {os.getcwd()} "
                                                  f"either. {LORA_PATH_HINT}") from None
        not_found: AdapterNotFoundError | None = None
        if self.index is not None:
            try:
                return name_or_path, self.index.locate(name_or_path)
            except AdapterNotFoundError as e:
                not_found = e
        if allow_absolute and _leads_to_adapter(name_or_path):
            return self._at_path(name_or_path)
        path = locate_hub(name_or_path, self.hf_cache_dir, self.hub_download)
        if path is not None:
            return name_or_path, path
        raise not_found or AdapterNotFoundError(
            name_or_path, None, "not found: no adapter directory is configured (slora.adapter_dir) "
                                "and it is not in the Hugging Face cache")

    def _at_path(self, given: str) -> tuple[str, str]:
        """(name, real path) of the adapter directory at `given` (absolute, or relative to the
        working directory), or of the compressed adapter whose path it is (what the index's
        `locate` gave, carried as `lora_path`); named as the directory's adapter when it is one."""
        path = os.path.realpath(given)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)) and split_path(path) is None:
            raise AdapterNotFoundError(given, CONFIG_NAME, f"not found in {path}")
        return (self.index.name_of(path) if self.index else None) or given, path

    def lora_int_id(self, name: str) -> int:
        """A positive id, stable per name (see IdRegistry)."""
        if not isinstance(name, str) or not name:
            raise AdapterError(str(name), None, "an adapter name must be a non-empty string")
        return self._ids.get(name)


def _leads_to_adapter(relative: str) -> bool:
    """Whether `relative` names an adapter directory from the working directory."""
    return isinstance(relative, str) and os.path.isfile(os.path.join(relative, CONFIG_NAME))
