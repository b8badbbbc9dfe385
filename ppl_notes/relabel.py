r"""Label switching: chains, restarts or fits that found one mixture under permuted labels.

A mixture's likelihood is the same under every permutation of its K components, so
without an ordering prior two chains (or two VI restarts, or VI and NUTS) can settle on
the same solution with the labels swapped: each chain is fine, but R-hat, summaries and
``compare()`` pool or set side by side draws that mean different components.

The components are found from the story: a discrete latent site with K categories (the
per-unit assignment), and the continuous sites with an axis of length K (weights,
locations, scales). Each chain is relabelled by the pivot method: the permutation of its
components that brings its component means closest to the pivot's -- chain 0, or the
reference posterior in ``compare()`` -- in units of the pooled posterior sd (Stephens
2000, "Dealing with label switching in mixture models", JRSS B, in its simplest form:
the pivot as the reference labelling, one permutation per chain). A permutation is
applied only when it cuts that distance to under a quarter of the identity's, so
chains that agree are never touched; the assignment site's values are mapped along, and
a warning says what was permuted. Switching *within* a chain (rare with NUTS once it has
settled) is not undone.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = ["components_of", "align_chains", "permutation_to"]

#: Permute only when it brings the distance under this share of the identity's
IMPROVEMENT = 0.25
#: Permutations are searched exhaustively up to this many components
MAX_COMPONENTS = 7


def components_of(facts) -> dict[str, Any] | None:
    """``{"size": K, "sites": {name: axis}, "discrete": [names]}`` of a mixture, or None.

    ``axis`` counts the site's own dims (after the sample dims), from the left.
    """
    sizes = {}
    for name in facts.discrete:
        fn = facts.trace.nodes[name]["fn"]
        try:
            sizes[name] = int(fn.enumerate_support(expand=False).shape[0])
        except (NotImplementedError, AttributeError):
            continue
    if not sizes or len(set(sizes.values())) != 1:
        return None
    size = next(iter(sizes.values()))
    if not 2 <= size <= MAX_COMPONENTS:
        return None
    sites = {}
    for name in facts.continuous:
        shape = tuple(facts.value_shapes[name])
        axes = [i for i, n in enumerate(shape) if n == size]
        if axes:
            sites[name] = axes[-1]
    return {"size": size, "sites": sites, "discrete": sorted(sizes)} if sites else None


def _means(posterior: dict[str, np.ndarray], components: dict, chain_axis: bool):
    """Per chain (or whole), each component's feature vector: (chains, K, features)."""
    blocks = []
    for name, axis in components["sites"].items():
        values = np.asarray(posterior[name], dtype=float)
        lead = 2 if chain_axis else 1
        moved = np.moveaxis(values, lead + axis, lead)  # (chain, draw, K, ...)
        flat = moved.reshape(moved.shape[:lead + 1] + (-1,))
        blocks.append(flat)
    stacked = np.concatenate(blocks, axis=-1)
    if chain_axis:
        return stacked.mean(axis=1), stacked.reshape((-1,) + stacked.shape[2:]).std(axis=0)
    return stacked.mean(axis=0)[None], stacked.std(axis=0)


def permutation_to(means: np.ndarray, pivot: np.ndarray, scale: np.ndarray) -> tuple[int, ...]:
    """The permutation ``p`` with ``means[p[k]]`` closest to ``pivot[k]``, or the identity.

    ``means``, ``pivot``: (K, features); ``scale``: the features' sds. The identity is
    kept unless ``p`` cuts the standardised distance under ``IMPROVEMENT`` of it.
    """
    size = means.shape[0]
    scale = np.where(scale > 0, scale, 1.0)

    def cost(order):
        return float((((means[list(order)] - pivot) / scale) ** 2).sum())

    identity = tuple(range(size))
    best = min(itertools.permutations(identity), key=cost)
    return best if cost(best) < IMPROVEMENT * cost(identity) else identity


def apply_permutation(posterior: dict[str, np.ndarray], components: dict,
                      order: tuple[int, ...], chain: int) -> None:
    """Relabel chain ``chain`` in place with ``order``; the assignments are mapped along."""
    inverse = np.argsort(order)
    for name, axis in components["sites"].items():
        posterior[name][chain] = np.take(posterior[name][chain], list(order), axis=1 + axis)
    for name in components["discrete"]:
        if name in posterior:
            posterior[name][chain] = inverse[posterior[name][chain]]


def align_chains(posterior: dict[str, np.ndarray], components: dict | None) -> list[str]:
    """Relabel chains 1.. to chain 0's labelling in place; what was done, in words."""
    if components is None:
        return []
    means, scale = _means(posterior, components, chain_axis=True)
    done = []
    for chain in range(1, means.shape[0]):
        order = permutation_to(means[chain], means[0], scale)
        if order != tuple(range(len(order))):
            apply_permutation(posterior, components, order, chain)
            done.append(f"chain {chain}: components {list(order)} -> {list(range(len(order)))}")
    return done


def aligned_to(posterior, reference):
    """``posterior`` relabelled to ``reference``'s labels (a copy), and what was done.

    For ``compare()``: VI and NUTS, or two runs, that found one mixture with the labels
    swapped. Both must carry the story's components (``info["components"]``).
    """
    components = posterior.info.get("components")
    if not components or components != reference.info.get("components"):
        return posterior, []
    mine = {name: posterior.draws(name) for name in components["sites"]}
    theirs = {name: reference.draws(name) for name in components["sites"]}
    means, _ = _means(mine, components, chain_axis=False)
    pivot, scale = _means(theirs, components, chain_axis=False)
    order = permutation_to(means[0], pivot[0], scale)
    if order == tuple(range(len(order))):
        return posterior, []
    tree = posterior.tree.copy(deep=True)
    dataset = tree["posterior"].to_dataset()
    inverse = np.argsort(order)
    for name, axis in components["sites"].items():
        array = dataset[name]
        dim = array.dims[len(posterior.sample_dims) + axis]
        dataset[name] = array.isel({dim: list(order)}).assign_coords(
            {dim: array[dim].values} if dim in array.coords else {})
    for name in components["discrete"]:
        if name in dataset:
            dataset[name] = dataset[name].copy(data=inverse[dataset[name].values])
    tree["posterior"] = tree["posterior"].__class__(dataset)
    return (type(posterior)(tree, model=posterior.model, guide=posterior.guide,
                            data=posterior.data),
            [f"components {list(order)} -> {list(range(len(order)))}"])
