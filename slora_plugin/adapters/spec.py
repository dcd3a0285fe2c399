"""`AdapterSpec`: everything known about an adapter from its config and file metadata.

Building one reads `adapter_config.json` and stats the weight file, nothing more, so the
scheduler can ask for `num_pages` of thousands of adapters cheaply. `content_id` changes
whenever either file changes on disk (size, mtime, inode), which is also how remembered errors
and cached packed copies notice that an operator fixed or replaced an adapter.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Mapping

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from slora_plugin.adapters.validate import AdapterPlan, load_config_json, plan_adapter
from slora_plugin.layout import LayoutError, ModelDims, PageLayout, plan_layout

StatKey = tuple[int, int, int, int]  # (size, mtime_ns, ino, dev)


def stat_key(path: str) -> StatKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True, eq=False)
class AdapterSpec:
    """One validated adapter (config level). `ranks[m]` is module m's rank in the layout."""

    name: str
    path: str
    ranks: Mapping[str, int]
    content_id: str
    layout: PageLayout
    plan: AdapterPlan = field(repr=False)

    @property
    def num_pages(self) -> int:
        return self.layout.num_pages

    @property
    def weights_file(self) -> str:
        return os.path.join(self.path, WEIGHTS_NAME)


def files_key(path: str) -> tuple[StatKey | None, StatKey | None]:
    """What must stay equal for a cached spec, packed copy or error to still be valid."""
    return stat_key(os.path.join(path, CONFIG_NAME)), stat_key(os.path.join(path, WEIGHTS_NAME))


def build_spec(name: str, path: str, key: tuple[StatKey | None, StatKey | None], dims: ModelDims,
               page_elems: int, max_rank: int) -> AdapterSpec:
    """Read and validate the config of the adapter at `path` (a real directory path)."""
    config_key, weights_key = key
    if config_key is None:
        raise AdapterError(name, CONFIG_NAME, f"not found in {path}")
    if weights_key is None:
        other = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(path, f))]
        hint = f" ({other[0]} is there: convert it to safetensors)" if other else ""
        raise AdapterError(name, WEIGHTS_NAME, f"not found in {path}{hint}")
    try:
        with open(os.path.join(path, CONFIG_NAME), "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AdapterError(name, CONFIG_NAME, f"cannot be read ({e})") from None
    cfg = load_config_json(raw, name)
    plan = plan_adapter(cfg, dims, name, max_rank)
    ranks = plan.ranks
    try:
        layout = plan_layout(ranks, dims, page_elems)
    except LayoutError as e:
        raise AdapterError(name, CONFIG_NAME, f"cannot be laid out in pages: {e}") from None
    digest = hashlib.sha1(raw)
    digest.update(repr((path, weights_key)).encode())
    return AdapterSpec(name=name, path=path, ranks=ranks, content_id=digest.hexdigest()[:16],
                       layout=layout, plan=plan)
