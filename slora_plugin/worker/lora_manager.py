"""vLLM's LoRA managers, with page tables instead of stacked slots.

vLLM still decides *which slot* an adapter occupies in a step (`max_loras` slots, LRU); we keep
that machinery and its token->slot metadata, and change what a slot is: activating an adapter
writes the slot's row in the kernels' tables (`tables.py`) -- no weight copy, because the
adapter's weights were already copied into its KV pages when the scheduler's load command was
applied (`worker.py`). An adapter can only be activated while resident; the scheduler admits a
request only after issuing its adapter's load, so a miss here is a bug, reported as such.
"""

from __future__ import annotations

from typing import Hashable

from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from slora_plugin.config import engine_settings
from slora_plugin.core_layout import CoreLayout
from slora_plugin.layout import PACKED_MODULES, PageLayout
from slora_plugin.patches import lora_layers as layers_patch
from slora_plugin.patches import lora_worker as worker_patch
from slora_plugin.worker.lora_layers import PAGED_CLASSES, PagedLoRAError, PagedLoRALayer
from slora_plugin.worker.ops import PagedLoRARuntime, install
from slora_plugin.worker.tables import CoreRows, SlotRows, core_rows, slot_rows


class AdapterNotResidentError(RuntimeError):
    """A step asked for an adapter whose pages were never loaded (or were evicted)."""


class SLoRAModelManager(LRUCacheLoRAModelManager):
    """Slots are rows of the page tables; adapters are registered only while resident."""

    def __init__(self, model, max_num_seqs, max_num_batched_tokens, vocab_size, lora_config,
                 device, vllm_config) -> None:
        if lora_config.fully_sharded_loras:
            raise PagedLoRAError("slora-plugin does not support fully_sharded_loras")
        self.slora_config = engine_settings(vllm_config)
        #: lora_id -> (rows, rank): a plain adapter's paged rows or a compressed one's core rows
        self._resident: dict[int, tuple[SlotRows | CoreRows, int]] = {}
        self._dummies: set[int] = set()
        with layers_patch.paged_lora_classes(PAGED_CLASSES):
            super().__init__(model, max_num_seqs, max_num_batched_tokens, vocab_size,
                             lora_config, device, vllm_config)
        worker_patch.check_model_manager(self)
        if self.supports_mm:
            raise PagedLoRAError("slora-plugin does not support multimodal models yet")
        self.runtime = PagedLoRARuntime(worker_patch.num_slots(self),
                                        self.slora_config.max_lora_rank,
                                        self.max_num_batched_tokens, device)
        install(self.runtime)

    # -- which modules get paged LoRA ------------------------------------------------------
    def _match_target_modules(self, module_name: str) -> bool:
        """Only the linear modules the page layout knows; never embeddings or lm_head."""
        if module_name.rsplit(".", 1)[-1] not in PACKED_MODULES:
            return False
        return super()._match_target_modules(module_name)

    def register_module(self, module_name: str, module) -> None:
        if not isinstance(module, PagedLoRALayer):
            raise PagedLoRAError(f"{module_name}: wrapped by {type(module).__name__}, which the "
                                 f"plugin cannot serve from pages")
        module.bind_paged(module_name)
        super().register_module(module_name, module)

    # -- residency (driven by the scheduler's commands) ------------------------------------
    def mark_resident(self, lora_id: int, layout: PageLayout | CoreLayout,
                      block_ids: tuple[int, ...], group: Hashable | None = None) -> None:
        """The adapter's weights are (being) copied into `block_ids`: point its slot there. A
        compressed adapter (`CoreLayout`) names its resident cluster's key as `group`
        (`compressed_bases.ResidentBases.groups`); its slot gets core rows and rank 0."""
        if isinstance(layout, CoreLayout):
            bases = self.runtime.compressed
            if bases is None:
                raise PagedLoRAError(f"LoRA adapter id {lora_id} is compressed but this engine "
                                     f"serves no compressed collection")
            if group not in bases.groups:
                raise PagedLoRAError(f"LoRA adapter id {lora_id}: its cluster {group!r} has no "
                                     f"resident bases (collections are read at engine start)")
            rows: SlotRows | CoreRows = core_rows(layout, block_ids, bases.group_of(group))
            rank = 0
        else:
            rows = slot_rows(layout, block_ids, self.slora_config.max_lora_rank)
            rank = max((pl.rank for pl in layout.modules.values()), default=0)
        self._resident[lora_id] = (rows, rank)
        self._dummies.discard(lora_id)
        slot = self._slot_of(lora_id)
        if slot is not None:
            self._write_slot(slot, rows)

    def _write_slot(self, slot: int, rows: SlotRows | CoreRows) -> None:
        if isinstance(rows, CoreRows):
            self.runtime.tables.write_cores(slot, rows)
        else:
            self.runtime.tables.write(slot, rows)

    def evict(self, lora_id: int) -> None:
        """The adapter's pages were taken back: it must not be used until loaded again."""
        self.remove_adapter(lora_id)
        self._resident.pop(lora_id, None)

    def is_resident(self, lora_id: int) -> bool:
        return lora_id in self._resident

    def resident_model(self, lora_id: int) -> LoRAModel:
        """A weightless LoRAModel for vLLM's bookkeeping of a resident adapter."""
        if lora_id not in self._resident:
            raise AdapterNotResidentError(
                f"LoRA adapter id {lora_id} is used in a step but its pages are not loaded; the "
                f"slora scheduler must issue a load command before scheduling its requests")
        return LoRAModel(lora_id, self._resident[lora_id][1], {})

    def add_dummy(self, lora_id: int, rank: int) -> bool:
        """vLLM's warm-up adapters: registered as rank-0 slots (they read and add nothing)."""
        self._dummies.add(lora_id)
        return self.add_adapter(LoRAModel(lora_id, rank, {}))

    # -- slots ------------------------------------------------------------------------------
    def _slot_of(self, lora_id: int) -> int | None:
        return worker_patch.slot_of(self, lora_id)

    def _add_adapter(self, lora: LoRAModel) -> None:
        worker_patch.register_adapter(self, lora)  # no merged weights: nothing is copied

    def activate_adapter(self, lora_id: int) -> bool:
        activated = super().activate_adapter(lora_id)
        if activated:
            slot = self._slot_of(lora_id)
            assert slot is not None
            if lora_id in self._resident:
                self._write_slot(slot, self._resident[lora_id][0])
            elif lora_id in self._dummies:
                self.runtime.tables.clear(slot)
            else:
                self._deactivate_adapter(lora_id)
                raise AdapterNotResidentError(
                    f"LoRA adapter id {lora_id} was activated without resident pages")
        return activated

    def _deactivate_adapter(self, lora_id: int) -> None:
        slot = self._slot_of(lora_id)
        super()._deactivate_adapter(lora_id)
        if slot is not None:
            self.runtime.tables.clear(slot)

    def remove_all_adapters(self) -> None:
        super().remove_all_adapters()
        self._dummies.clear()
        self.runtime.tables.clear_all()

    def _set_adapter_mapping(self, mapping) -> None:
        """Only the per-token slots, not vLLM's `update_metadata`: its kernel metadata is never
        read here and costs two host-device syncs per call (`worker_patch.update_token_slots`);
        and the step's distinct adapters, counted on the host from the mapping (no sync)."""
        self.runtime.set_token_slots(worker_patch.update_token_slots(self, mapping),
                                     worker_patch.distinct_adapters(mapping))


class SLoRAWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """Adapters come from pages, never from disk here (the host store reads the disk)."""

    _manager_cls = SLoRAModelManager

    def _load_adapter(self, lora_request) -> LoRAModel:
        return self.model_manager.resident_model(lora_request.lora_int_id)

    def add_dummy_lora(self, lora_request, rank: int) -> bool:
        if lora_request.lora_int_id in self.list_adapters():
            return False
        return self.model_manager.add_dummy(lora_request.lora_int_id, rank)

    @property
    def model_manager(self) -> SLoRAModelManager:
        return worker_patch.adapter_manager(self)

