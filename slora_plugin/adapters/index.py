"""The adapter directory: names -> paths, safely, and a stable integer id per name.

One sub-directory per adapter (`adapter_config.json` + `adapter_model.safetensors`); names may be
nested (`org/name`). A sub-directory holding `collection.json` is a compressed collection whose
adapters are `<collection>/<adapter>` (`adapters/compressed.py`). Nothing here reads a config or
a weight file: `scan()` only lists directories (and reads each collection's manifest), so a
directory of 10,000 adapters is indexed in well under a second, and `locate()` looks at the
disk directly, so an adapter copied in after start-up is found on its first request.

Names come from HTTP clients (vLLM's resolver hands us the `model` field of a request), so a name
is confined to the directory: no `..`, no absolute name, no symlink that leads outside.
"""

from __future__ import annotations

import fcntl
import os
import threading

from slora_plugin.adapters.compressed import find_in, member_names
from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from slora_plugin.compress.collection import MANIFEST

#: The id file kept in the adapter directory (when writable): one "id<TAB>name" line per name.
IDS_FILE = ".slora-ids"


def check_name(name: str) -> list[str]:
    """The path components of a directory-relative adapter name, or an AdapterError saying why
    the name is not acceptable."""
    if not isinstance(name, str) or not name:
        raise AdapterError(str(name), None, "an adapter name must be a non-empty string")
    if "\x00" in name:
        raise AdapterError(name, None, "the name contains a NUL character")
    if name.startswith("/"):
        raise AdapterError(name, None, "an adapter name must be relative to the adapter directory, "
                                       "not an absolute path")
    parts = name.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise AdapterError(name, None, f"the name has a {p or 'empty'!r} path component; names "
                                           f"may not leave or re-enter the adapter directory")
        if p.startswith("."):
            raise AdapterError(name, None, f"the name has a hidden component {p!r}")
    return parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class AdapterIndex:
    """Lazy index of one adapter directory (thread-safe)."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise AdapterError(root, None, "the adapter directory does not exist")
        self.root = os.path.realpath(root)
        self._names: list[str] | None = None
        #: Entries the last scan left out because they are symlinks leading outside the
        #: directory, as errors saying so: `adapters check` reports them instead of the adapter
        #: silently missing from the listing.
        self.skipped: list[AdapterError] = []
        self._lock = threading.Lock()
        #: Stable name -> id table, kept next to the adapters.
        self.ids = IdRegistry(self.root)

    # ---- lookup -------------------------------------------------------------------------------
    def locate(self, name: str) -> str:
        """The real path of adapter `name`; AdapterNotFoundError if it is not there (yet)."""
        parts = check_name(name)
        path = os.path.realpath(os.path.join(self.root, *parts))
        if not _inside(path, self.root):
            raise AdapterError(name, None, f"the name leads outside the adapter directory "
                                           f"{self.root} (to {path}, through a symlink)")
        config = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config):
            member = self._locate_compressed(name, parts)
            if member is not None:
                return member
            raise AdapterNotFoundError(name, None, f"no adapter of that name in {self.root} "
                                                   f"({CONFIG_NAME} not found)")
        for fname in (CONFIG_NAME, WEIGHTS_NAME):
            real = os.path.realpath(os.path.join(path, fname))
            if os.path.lexists(os.path.join(path, fname)) and not _inside(real, self.root):
                raise AdapterError(name, fname, f"is a symlink that leads outside the adapter "
                                                f"directory {self.root} (to {real})")
        return path

    def _locate_compressed(self, name: str, parts: list[str]) -> str | None:
        """The path of `name` as an adapter of a compressed collection (`adapters/compressed.py`:
        the collection's real directory joined with the adapter's name in it), or None when no
        leading part of the name is a collection. Only asked once the plain lookup failed, so a
        plain adapter's lookup costs what it did."""
        found = find_in(self.root, parts)
        if found is None:
            return None
        directory, member = found
        real = os.path.realpath(directory)
        if not _inside(real, self.root):
            raise AdapterError(name, None, f"the name leads outside the adapter directory "
                                           f"{self.root} (to {real}, through a symlink)")
        manifest = os.path.realpath(os.path.join(real, MANIFEST))
        if not _inside(manifest, self.root):
            raise AdapterError(name, MANIFEST, f"is a symlink that leads outside the adapter "
                                               f"directory {self.root} (to {manifest})")
        return os.path.join(real, *member.split("/"))

    def name_of(self, real_path: str) -> str | None:
        """The directory-relative name of a real path inside the directory, else None."""
        if real_path != self.root and _inside(real_path, self.root):
            return os.path.relpath(real_path, self.root).replace(os.sep, "/")
        return None

    # ---- listing ------------------------------------------------------------------------------
    def scan(self, collections: bool = True) -> list[str]:
        """List every adapter name (sorted); reads directory entries only, and the manifest of
        each compressed collection, whose adapters are listed as `<collection>/<adapter>`
        (`collections=False`: plain adapters only, e.g. what `adapters compress` may read; a
        collection is still a leaf, never searched for plain adapters)."""
        found: list[str] = []
        skipped: list[AdapterError] = []
        stack = [(self.root, "")]
        while stack:
            directory, prefix = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            if any(e.name == CONFIG_NAME for e in entries):
                if prefix:
                    found.append(prefix.rstrip("/"))
                continue  # an adapter directory is a leaf
            if prefix and any(e.name == MANIFEST for e in entries):
                # a compressed collection is a leaf too: its manifest names its adapters
                if collections:
                    try:
                        members = member_names(directory, prefix.rstrip("/"))
                    except AdapterError as e:
                        skipped.append(AdapterError(prefix.rstrip("/"), MANIFEST, f"skipped: {e.reason}"))
                        members = []
                    for member in members:
                        try:
                            check_name(member)
                            found.append(member)
                        except AdapterError as e:
                            skipped.append(AdapterError(e.adapter, MANIFEST, f"skipped: {e.reason}"))
                continue
            for e in entries:
                if e.name.startswith(".") or not e.is_dir():
                    continue
                if e.is_symlink() and not _inside(os.path.realpath(e.path), self.root):
                    skipped.append(self._outside_link(prefix + e.name, e.path))
                    continue
                stack.append((e.path, prefix + e.name + "/"))
        found.sort()
        skipped.sort(key=lambda err: err.adapter)
        with self._lock:
            self._names = found
            self.skipped = skipped
        return found

    def _outside_link(self, name: str, path: str) -> AdapterError:
        """The error for a directory symlink `scan()` skips: the same rule as `locate()`."""
        return AdapterError(name, None, f"skipped: a symlink that leads outside the adapter "
                                        f"directory {self.root} (to {os.path.realpath(path)})")

    def names(self) -> list[str]:
        """The names from the last scan (scanning once if never scanned)."""
        with self._lock:
            names = self._names
        return list(names) if names is not None else self.scan()



class IdRegistry:
    """Append-only name -> id table shared by every process through a locked file.

    Ids are handed out in order of first request, never reused and never derived from hash(),
    so a name keeps its id across restarts and processes (vLLM wants lora_int_id unique).
    Kept in `root/IDS_FILE` when `root` is a writable directory, else for this process only.
    """

    def __init__(self, root: str | None) -> None:
        self.path = os.path.join(root, IDS_FILE) if root else ""
        self.persistent = bool(root) and os.access(root, os.W_OK)
        self._ids: dict[str, int] = {}
        self._read_upto = 0  # bytes of the file already parsed (it is append-only)
        self._lock = threading.Lock()

    def get(self, name: str) -> int:
        with self._lock:
            if name in self._ids:
                return self._ids[name]
            if not self.persistent:
                self._ids[name] = len(self._ids) + 1
                return self._ids[name]
            try:
                with open(self.path, "a+", encoding="utf-8") as f:
                    fcntl.flock(f, fcntl.LOCK_EX)
                    f.seek(self._read_upto)
                    self._ids.update(_parse_ids(f.read()))  # only what others appended since
                    if name not in self._ids:
                        new_id = max(self._ids.values(), default=0) + 1
                        f.write(f"{new_id}\t{name}\n")
                        f.flush()
                        self._ids[name] = new_id
                    self._read_upto = f.tell()
            except OSError:
                # A read-only mount that still reports W_OK: fall back to per-process ids.
                self.persistent = False
                self._ids.setdefault(name, max(self._ids.values(), default=0) + 1)
            return self._ids[name]


def _parse_ids(text: str) -> dict[str, int]:
    ids = {}
    for line in text.splitlines():
        num, sep, name = line.partition("\t")
        if sep and num.isdigit():
            ids[name] = int(num)
    return ids
