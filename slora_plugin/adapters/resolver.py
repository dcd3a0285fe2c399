"""vLLM glue: a `LoRAResolver` that answers any adapter name of the directory, and a helper
that builds a `LoRARequest` for offline `LLM.generate`.

With `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, vLLM's OpenAI server asks every registered resolver
about a `model` name it does not know (`entrypoints/openai/models/serving.py:resolve_lora`) and
then loads the adapter with `engine_client.add_lora`. So `vllm serve` answers a request for any
adapter of the directory without `--lora-modules` or a load call. The resolver only locates the
adapter (directory, then the HF cache): validation happens in the engine, where a bad adapter
fails its own requests with the AdapterError's message and nothing else (`patches/openai_errors.py`
carries that message into the HTTP answer). A name the directory refuses (`..`, a hidden or
absolute component, a symlink leading outside) raises `AdapterRequestError`, which vLLM answers
400 with the reason; an unknown name resolves to None, which vLLM answers 404.
"""

from __future__ import annotations

import asyncio
import logging
import os

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.sources import AdapterSources
from slora_plugin.config import SLoRAConfig
from slora_plugin.patches.openai_errors import AdapterRequestError

logger = logging.getLogger(__name__)

#: The name the resolver is registered under in vLLM's LoRAResolverRegistry.
RESOLVER_NAME = "slora"


class SLoRAResolver(LoRAResolver):
    """Resolve adapter names (never absolute paths: names come from HTTP clients)."""

    def __init__(self, sources: AdapterSources) -> None:
        self.sources = sources

    def resolve(self, lora_name: str) -> LoRARequest | None:
        """Synchronous core of `resolve_lora` (disk look-ups only): None for an unknown name,
        AdapterRequestError (the AdapterError's text) for a name the directory refuses."""
        try:
            name, path = self.sources.locate(lora_name, allow_absolute=False)
        except AdapterNotFoundError:
            return None
        except AdapterError as e:
            logger.warning("slora: refusing adapter name: %s", e)
            raise AdapterRequestError(str(e)) from None
        return LoRARequest(lora_name=name, lora_int_id=self.sources.lora_int_id(name), lora_path=path)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        return await asyncio.to_thread(self.resolve, lora_name)


def register_resolver(cfg: SLoRAConfig | None) -> SLoRAResolver | None:
    """Register the resolver with vLLM if the plugin is on and has an adapter directory.
    Idempotent (re-registering replaces the previous instance under the same name)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    if cfg is None or not cfg.adapter_dir:
        return None
    existing = LoRAResolverRegistry.resolvers.get(RESOLVER_NAME)
    if isinstance(existing, SLoRAResolver) and existing.sources.index is not None and \
            existing.sources.index.root == os.path.realpath(cfg.adapter_dir):
        return existing
    resolver = SLoRAResolver(AdapterSources(cfg.adapter_dir))
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    return resolver


def lora_request(name: str, store_or_dir: object) -> LoRARequest:
    """A `LoRARequest` for adapter `name` (offline `LLM.generate(..., lora_request=...)`), with
    a stable `lora_int_id`. `store_or_dir`: an AdapterStore, an AdapterSources or a directory."""
    from slora_plugin.adapters.store import AdapterStore

    if isinstance(store_or_dir, AdapterStore):
        sources = store_or_dir.sources
    elif isinstance(store_or_dir, AdapterSources):
        sources = store_or_dir
    elif isinstance(store_or_dir, str):
        sources = AdapterSources(store_or_dir)
    else:
        raise TypeError(f"store_or_dir must be an AdapterStore, AdapterSources or a directory path, "
                        f"got {type(store_or_dir).__name__}")
    name, path = sources.locate(name)
    return LoRARequest(lora_name=name, lora_int_id=sources.lora_int_id(name), lora_path=path)
