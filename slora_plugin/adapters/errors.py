"""The one error type of the host store: a bad adapter names itself, its file, and why.

A request for a broken adapter must fail with a message an operator can act on ("adapter
`org/x`, file adapter_config.json: use_dora is true; DoRA is not supported"), and must never
take the server or the other adapters down with it.
"""

from __future__ import annotations


class AdapterError(Exception):
    """`adapter`: the name (or path) asked for; `file`: the file at fault (None when the
    problem is the name or the store); `reason`: what is wrong, in words."""

    def __init__(self, adapter: str, file: str | None, reason: str) -> None:
        self.adapter = adapter
        self.file = file
        self.reason = reason
        where = f", file {file}" if file else ""
        super().__init__(f"adapter {adapter!r}{where}: {reason}")

    def __reduce__(self):  # keep the attributes across pickling (engine <-> front end)
        return (type(self), (self.adapter, self.file, self.reason))


class AdapterNotFoundError(AdapterError):
    """No adapter of that name in the directory (nor in the Hugging Face cache)."""


class HostCacheFullError(AdapterError):
    """Transient: every byte of the host cache is leased right now. Not remembered."""
