"""Which linear layers of a transformers model an adapter's `target_modules` names, by PEFT's
rules, so an adapter trained here loads in PEFT (and in the plugin) onto the same layers.

PEFT (`check_target_module_exists`, `_maybe_include_all_linear_layers`): a list matches a module
whose full name equals an entry or ends with "." + entry; a string is a regex that must match the
full name; "all-linear" is the list of the last name components of every linear layer except the
output layer. Only `torch.nn.Linear` layers can be trained here.
"""

from __future__ import annotations

import re

from torch import nn

ALL_LINEAR = "all-linear"


def resolve_targets(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[str]:
    """Full names of the modules matched, in model order; ValueError if none is or one is not a
    Linear layer."""
    if target_modules == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        excluded = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is output}
        target_modules = tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                       if isinstance(m, nn.Linear)} - excluded))
    if isinstance(target_modules, str):
        rx = re.compile(target_modules)
        matched = [(n, m) for n, m in model.named_modules() if n and rx.fullmatch(n)]
    else:
        matched = [(n, m) for n, m in model.named_modules()
                   if n and any(n == t or n.endswith("." + t) for t in target_modules)]
    if not matched:
        raise ValueError(f"target_modules {target_modules!r} match no module of the base model")
    bad = [n for n, m in matched if not isinstance(m, nn.Linear)]
    if bad:
        raise ValueError(f"target_modules {target_modules!r} match modules that are not nn.Linear: {bad[:5]}")
    return [n for n, _ in matched]
