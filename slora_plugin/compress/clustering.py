"""Group the adapters of a collection into C clusters that share bases.

Why: adapters trained on unrelated tasks use unrelated subspaces; one pair of rank-K bases for
all of them spreads K over everyone. The paper clusters the LoRAs and compresses each cluster
jointly. An adapter belongs to one cluster in every layer and module, so serving looks up one
set of bases per token.

What "similar" means here is what joint compression rewards: overlapping column and row spaces
of ΔW, whatever the sign or the pairing of directions. Per (layer, module) the feature of
adapter i is a sketch of its column-space and row-space Gram operators, [vec(S Sᵀ), vec(Sᵀ S)]
with S = Ωᵀ ΔW_i Ψ (p x p, Ω and Ψ fixed Gaussian, computed as (Ωᵀ s B)(A Ψ): no ΔW formed):
inner products of these approximate tr(ΔW_i ΔW_iᵀ ΔW_j ΔW_jᵀ), large exactly when the adapters
share directions. Each (layer, module) block is normalised, the adapter's whole feature too
(cosine similarity), and k-means (k-means++ starts, Lloyd iterations, best of several seeds)
groups the features.
"""

from __future__ import annotations

import torch

from slora_plugin.compress.source import ModuleStack

#: Sketch width p: the feature of one (layer, module) has 2 p² numbers.
SKETCH = 8
KMEANS_RESTARTS = 8
KMEANS_ITERS = 100


def sketch_features(stack: ModuleStack, seed: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, 2 p²) unit-norm features of the members of `stack` (zero rows for a zero ΔW)."""
    d_out, d_in = stack.b.shape[1], stack.a.shape[2]
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(d_out, SKETCH, generator=gen, dtype=dtype).to(device)
    psi = torch.randn(d_in, SKETCH, generator=gen, dtype=dtype).to(device)
    feats = []
    for sb, a in stack.chunks(256, device, dtype):
        s = (omega.T @ sb) @ (a @ psi)                                   # (c, p, p)
        f = torch.cat([(s @ s.transpose(1, 2)).flatten(1), (s.transpose(1, 2) @ s).flatten(1)], dim=1)
        feats.append(_unit_rows(f).cpu())
    return torch.cat(feats)


def kmeans(features: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """(n,) int64 cluster of each row of `features` (unit rows): the lowest-inertia result of
    KMEANS_RESTARTS k-means++ starts. Every cluster gets at least one member."""
    n = features.shape[0]
    if not 1 <= clusters <= n:
        raise ValueError(f"cannot make {clusters} clusters of {n} adapters")
    x = features.double()
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(KMEANS_RESTARTS):
        labels, inertia = _lloyd(x, _plus_plus(x, clusters, gen))
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    assert best is not None
    return best


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ starting centres: each next one drawn with probability ∝ squared distance."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
        if float(d2.sum()) <= 0:  # fewer distinct points than clusters: any point will do
            centres.append(x[int(torch.randint(n, (1,), generator=gen))])
        else:
            centres.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))])
    return torch.stack(centres)


def _lloyd(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lloyd iterations until the labels stop changing; an emptied cluster takes the point
    farthest from its centre among those of clusters with more than one member (so none stays
    empty)."""
    labels = None
    k = centres.shape[0]
    for _ in range(KMEANS_ITERS):
        dist = torch.cdist(x, centres)
        new = dist.argmin(1)
        for c in range(k):
            if not bool((new == c).any()):
                sizes = torch.bincount(new, minlength=k)
                own = dist.gather(1, new[:, None]).squeeze(1)
                far = int(torch.where(sizes[new] > 1, own, -1.0).argmax())
                new[far] = c
        if labels is not None and bool((new == labels).all()):
            break
        labels = new
        centres = torch.stack([x[labels == c].mean(0) for c in range(centres.shape[0])])
    assert labels is not None
    inertia = float(((x - centres[labels]) ** 2).sum())
    return labels, inertia


def _unit_rows(f: torch.Tensor) -> torch.Tensor:
    norms = f.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, f / norms.clamp_min(1e-300), torch.zeros_like(f))
