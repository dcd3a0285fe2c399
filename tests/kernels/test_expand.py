"""The expand launch alone against its reference (`expand_ref`): given K-split partials of h in the
entries the shrink writes (every other entry NaN, so a read outside them shows), y gains
scale * (sum of the partials) @ B^T on the adapter tokens' slices, within the error a correct
kernel may have, and every other element of y is unchanged bit for bit.

The error a correct kernel may have, per element: the sum of h's partials rounded to tf32 for the
dot (2^-10 relative, truncation allowed), at most r + split + 2 fp32 roundings (2^-23) of
sum |h_k B_k| (the partial sums, the rank sum, the scale and the add to y), and one ulp of y's dtype
for the final rounding. Same cases as tests/kernels/test_shrink.py: the decode step sums 8 partials
in the expand's runtime loop, the uneven 3-way split config sums its static split unrolled.
"""

from __future__ import annotations

import pytest
import torch

from slora_plugin.kernels.expand import expand_ref, paged_lora_expand
from slora_plugin.kernels.lora_linear import _ulp, bound_violations
from slora_plugin.kernels.shrink import shrink_buffer
from test_lora_linear import DEVICE, LAYERS, MAX_RANK
from test_shrink import CASES, live_rows, make_step


@pytest.mark.parametrize("case", sorted(CASES))
def test_expand_adds_scaled_h_times_b(case: str) -> None:
    layer, num_tokens, page_elems, dtype, config = CASES[case]
    module_ids, _, widths = LAYERS[layer]
    step = make_step(layer, num_tokens, page_elems, dtype, config)
    sp, split = step.sp, step.split
    h = shrink_buffer(num_tokens, len(module_ids), MAX_RANK, config, DEVICE).fill_(float("nan"))
    live = live_rows(step, module_ids, h.shape[3])
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    parts = torch.randn((split, *h.shape[1:]), generator=gen, device=DEVICE) / split ** 0.5
    h[:split] = torch.where(live, parts, float("nan"))
    y = torch.randn(num_tokens, sum(widths), generator=gen, device=DEVICE).to(dtype)
    got = y.clone()
    paged_lora_expand(got, h, sp.pool, step.meta, sp.b_addr, sp.ranks, sp.scales, module_ids, widths, MAX_RANK,
                      config)

    h_sum = torch.where(live, parts.double().sum(0), 0.0)
    h_abs = torch.where(live, parts.double().abs().sum(0), 0.0)
    want = expand_ref(y, h_sum, sp.pool, step.token_slot, sp.b_addr, sp.ranks, sp.scales, module_ids, widths)

    def terms(hh: torch.Tensor) -> torch.Tensor:  # scale * |h| @ |B^T| per element of y
        return expand_ref(torch.zeros_like(y), hh, sp.pool.abs(), step.token_slot, sp.b_addr, sp.ranks,
                          sp.scales.abs(), module_ids, widths)

    e = 2.0 ** -10 * terms(h_sum.abs()) + (MAX_RANK + split + 2) * 2.0 ** -23 * terms(h_abs)
    touched = e > 0
    allowed = torch.zeros_like(e)
    allowed[touched] = e[touched] + _ulp(want[touched].abs() + e[touched], dtype)
    assert touched.any() and not touched[step.token_slot < 0].any()
    bad, worst = bound_violations(got, want, allowed)
    assert bad == 0, f"{bad} elements outside the error bound (worst |err| / allowed = {worst:.3g})"
