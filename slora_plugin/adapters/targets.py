"""Which vLLM modules get LoRA layers: by default, only those some adapter of the directory targets.

Every wrapped module costs two kernel launches per layer per step even when no token of the step
has an adapter there (on an H100, Llama-2-7B, one adapter: 5,917 out tok/s with all four modules
wrapped against 6,250 with only qkv_proj and o_proj, 7,241 for the base model). Stock vLLM users
pick `--lora-target-modules` by hand; the plugin knows its adapter directory, so when
`slora.target_modules` is unset it wraps the union of what the adapters there target, computed
once at engine start.

What an adapter targets is what the store's validation says it targets (`validate.plan_adapter`:
PEFT's list / regex `target_modules`, `exclude_modules`, `layers_to_transform`, `rank_pattern`),
mapped to vLLM's fused modules with `layout.PACKED_MODULES`: one meaning everywhere. An adapter
that shows up later and targets a module without LoRA layers is refused by `check_wrapped` (the
store calls it in `AdapterStore.spec`), so it fails its own requests with a message saying how to
fix it instead of being served without part of its weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Collection, Iterable, Sequence

from slora_plugin.adapters.compressed import read_manifest, split_path
from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.peft_format import CONFIG_NAME
from slora_plugin.adapters.spec import AdapterSpec
from slora_plugin.adapters.validate import load_config_json, plan_adapter
from slora_plugin.config import SLoRAConfig, SLoRAConfigError
from slora_plugin.layout import MODULES, PACKED_MODULES, ModelDims

#: PEFT module -> the vLLM module that holds it (q_proj -> qkv_proj, ...).
PACKED_OF: dict[str, str] = {m: p for p, kids in PACKED_MODULES.items() for m in kids}
#: Every vLLM module the plugin can give LoRA layers, in canonical order.
ALL_PACKED: tuple[str, ...] = tuple(PACKED_MODULES)


def packed_modules(peft_modules: Iterable[str]) -> tuple[str, ...]:
    """The vLLM modules holding these PEFT modules, in canonical order."""
    wanted = {PACKED_OF[m] for m in peft_modules}
    return tuple(p for p in ALL_PACKED if p in wanted)


def wrapped_modules(lora_target_modules: Sequence[str] | None) -> tuple[str, ...]:
    """The vLLM modules that get LoRA layers under `LoRAConfig.target_modules`.

    vLLM's rule (`vllm.lora.utils.is_in_target_modules` with Llama's packed mapping): a fused
    module is wrapped when its own name or the name of one of its slices is listed; None wraps
    every module (the plugin never wraps embeddings or lm_head).
    """
    if lora_target_modules is None:
        return ALL_PACKED
    listed = set(lora_target_modules)
    return tuple(p for p in ALL_PACKED if p in listed or listed & set(PACKED_MODULES[p]))


def check_wrapped(spec: AdapterSpec, wrapped: Collection[str]) -> None:
    """Refuse an adapter that targets a module without LoRA layers in this engine: serving it
    without those weights would silently give another model's answers."""
    check_wrapped_modules(spec.name, [m for m in MODULES if spec.ranks.get(m, 0)], wrapped,
                          CONFIG_NAME)


def check_wrapped_modules(name: str, modules: Collection[str], wrapped: Collection[str],
                          file: str) -> None:
    """`check_wrapped` for adapter `name` adapting the PEFT `modules` (`file` says where)."""
    missing_peft = [m for m in MODULES if m in modules and PACKED_OF[m] not in wrapped]
    if not missing_peft:
        return
    missing = packed_modules(missing_peft)
    suggestion = [p for p in ALL_PACKED if p in wrapped or p in missing]
    raise AdapterError(
        name, file,
        f"targets {', '.join(missing_peft)} (vLLM module {', '.join(missing)}), which has no LoRA "
        f"layer in this engine: LoRA layers are only on {', '.join(p for p in ALL_PACKED if p in wrapped)} "
        f"(slora.target_modules, or when unset the modules the adapters in slora.adapter_dir "
        f"targeted at engine start); set slora.target_modules to include {', '.join(missing)} "
        f"and restart, e.g. \"target_modules\": {json.dumps(suggestion)}")


@dataclass(frozen=True)
class TargetSurvey:
    """What the adapters of a directory target, as found at engine start."""

    #: vLLM modules some readable, valid adapter targets (canonical order).
    modules: tuple[str, ...]
    #: Adapters in the directory.
    total: int
    #: Adapters whose config was read (reading stops once every module is targeted).
    read: int
    #: Adapters left out of the union: broken config or a name the store would refuse.
    skipped: tuple[str, ...]


def survey_directory(adapter_dir: str, dims: ModelDims, max_rank: int) -> TargetSurvey:
    """The union of the vLLM modules targeted by the adapters under `adapter_dir`.

    Each config is validated exactly as `AdapterStore.spec` validates it (broken ones are
    skipped: they fail their own requests later). Identical config files are validated once,
    and reading stops as soon as every module is targeted, so a directory of thousands of
    adapters made from a few recipes costs little more than reading their configs. The names
    come from `AdapterIndex.scan` (no directory symlinked outside the root); the store's
    per-file symlink check is not repeated (3 realpath calls per adapter, most of the cost): an
    adapter it would refuse can only widen the set, never narrow it. A compressed collection
    adds the modules of its manifest (one read per collection; a broken one is skipped like a
    broken config, counted once per adapter it lists).
    """
    index = AdapterIndex(adapter_dir)
    names = index.scan(collections=False)
    by_text: dict[bytes, frozenset[str] | None] = {}
    union: set[str] = set()
    skipped: list[str] = []
    read = 0
    for name in names:
        if len(union) == len(ALL_PACKED):
            break
        read += 1
        try:
            with open(os.path.join(index.root, name, CONFIG_NAME), "rb") as f:
                text = f.read()
        except OSError:
            skipped.append(name)
            continue
        if text not in by_text:
            try:
                plan = plan_adapter(load_config_json(text, name), dims, name, max_rank)
                by_text[text] = frozenset(packed_modules(plan.ranks))
            except AdapterError:
                by_text[text] = None
        modules = by_text[text]
        if modules is None:
            skipped.append(name)
        else:
            union |= modules
    compressed = sorted(set(index.scan()) - set(names))
    surveyed: set[str] = set()
    for name in compressed:
        if len(union) == len(ALL_PACKED):
            break
        try:
            found = split_path(index.locate(name))
            if found is None or found[0] in surveyed:
                continue
            surveyed.add(found[0])
            read += 1
            union |= set(packed_modules(read_manifest(found[0], name).modules))
        except AdapterError:
            skipped.append(name)
    return TargetSurvey(modules=tuple(p for p in ALL_PACKED if p in union),
                        total=len(names) + len(compressed), read=read, skipped=tuple(skipped))


@dataclass(frozen=True)
class TargetChoice:
    """The engine's LoRA modules and why."""

    #: The value for vLLM's `LoRAConfig.target_modules` (None: every module).
    target_modules: tuple[str, ...] | None
    #: The vLLM modules that get LoRA layers (canonical order).
    wrapped: tuple[str, ...]
    #: One sentence for the log and `slora-plugin doctor`.
    reason: str


def choose_target_modules(cfg: SLoRAConfig, dims: ModelDims | None,
                          vllm_target_modules: Sequence[str] | None = None) -> TargetChoice:
    """`slora.target_modules` if set, else vLLM's own `--lora-target-modules` if set, else the
    modules the adapters of `slora.adapter_dir` target, else (no directory, or no valid adapter
    in it yet) every module. `dims` is needed only for the adapters (a regex or
    `layers_to_transform` selects layers by index)."""
    for given, key in ((cfg.target_modules, "slora.target_modules"),
                       (vllm_target_modules, "vLLM's lora_target_modules")):
        if given is None:
            continue
        unknown = [t for t in given if t not in PACKED_MODULES and t not in PACKED_OF]
        if unknown:
            raise SLoRAConfigError(
                f"{key}: {unknown} names no module the plugin can give LoRA layers; use vLLM "
                f"names {list(ALL_PACKED)} (or the PEFT names {list(MODULES)})")
        return TargetChoice(tuple(given), wrapped_modules(given), f"set by {key}")
    if not cfg.adapter_dir:
        return TargetChoice(None, ALL_PACKED, "slora.target_modules unset and no "
                                              "slora.adapter_dir: every module")
    if dims is None:
        raise ValueError("choose_target_modules: the model's dims are needed to read the adapters "
                         f"of {cfg.adapter_dir}")
    survey = survey_directory(cfg.adapter_dir, dims, cfg.max_lora_rank)
    bad = f", {len(survey.skipped)} skipped (broken config)" if survey.skipped else ""
    if not survey.modules:
        return TargetChoice(None, ALL_PACKED, f"slora.target_modules unset and no valid adapter "
                                              f"in {cfg.adapter_dir} yet ({survey.total} found"
                                              f"{bad}): every module")
    seen = f"{survey.total} adapters" if survey.read == survey.total else \
        f"{survey.read} of {survey.total} adapters (every module already targeted)"
    why = (f"slora.target_modules unset: the modules targeted by the adapters in "
           f"{cfg.adapter_dir} ({seen}{bad}); set slora.target_modules to serve adapters added "
           f"later that target others")
    if survey.modules == ALL_PACKED:
        return TargetChoice(None, ALL_PACKED, why)
    return TargetChoice(survey.modules, survey.modules, why)
