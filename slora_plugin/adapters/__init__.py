"""Host side: the adapter directory, validation, the pinned host cache, and vLLM's resolver.

`AdapterStore` (store.py) is the entry point; `resolver.py` is the only module here that
imports vLLM.
"""

from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.spec import AdapterSpec
from slora_plugin.adapters.store import AdapterStore, Lease

__all__ = ["AdapterError", "AdapterNotFoundError", "AdapterSpec", "AdapterStore", "Lease"]
