"""Is the posterior proper? A check for stories with flat (improper) priors.

A site whose prior is masked out (``poutine.mask(mask=False)``), scaled to zero, or
``ImproperUniform`` contributes nothing to the log density: the posterior is proper only
if the likelihood bounds it. When it does not (``y ~ Normal(a + b, 1)`` with flat priors
on ``a`` and ``b``), the posterior does not integrate, MCMC drifts and SVI's guide widens
for as long as it runs while still reporting numbers. The signature is a direction of
zero curvature: the Hessian of the log joint over the flat sites' unconstrained
coordinates, at the fitted mean, has an eigenvalue of about zero. (A zero eigenvalue at
one point is evidence, not proof; the check only runs where some prior is flat, and a
proper prior on each site removes the warning.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pyro.distributions import ImproperUniform
from torch.distributions import biject_to

from ppl_notes.evaluation import evaluate
from ppl_notes.evaluation.facts import StoryFacts

__all__ = ["flat_prior_sites", "flat_direction"]

#: Curvature below this share of the largest counts as none, by the story's dtype: the
#: Hessian is exact up to round-off, so a proper but badly conditioned posterior (a
#: regression on years near 2000: kilpisjarvi's ratio is about 1e-5; earnings' interaction
#: about 1e-6) keeps far more than float64's noise, and float32's noise needs 1e-4.
RELATIVE_CURVATURE = {torch.float64: 1e-10, torch.float32: 1e-4}
#: Above this many flat coordinates the Hessian is not formed.
MAX_COORDINATES = 200


def flat_prior_sites(facts: StoryFacts) -> list[str]:
    """The continuous latent sites whose prior adds nothing to the log density."""
    flat = []
    for name in facts.continuous:
        site = facts.trace.nodes[name]
        fn = site["fn"]
        masks = [site.get("mask"), getattr(fn, "_mask", None)]
        masked = any(m is False or (isinstance(m, torch.Tensor) and not bool(m.any()))
                     for m in masks)
        zero_scale = isinstance(site.get("scale"), (int, float)) and site["scale"] == 0
        improper = isinstance(getattr(fn, "base_dist", fn), ImproperUniform)
        if masked or zero_scale or improper:
            flat.append(name)
    return flat


def flat_direction(model, data: Mapping[str, Any], facts: StoryFacts,
                   draws: Mapping[str, torch.Tensor], path: str) -> dict[str, Any] | None:
    """The direction of (near) zero curvature among the flat-prior sites, if any.

    Parameters
    ----------
    draws : dict of Tensor
        Constrained draws of every continuous latent site, draws first.

    Returns
    -------
    dict or None
        ``{"sites", "direction", "curvature", "largest"}``: the flat sites, the
        direction written as a combination of their coordinates, the smallest and the
        largest curvature; None when no flat direction is found.
    """
    flat = flat_prior_sites(facts)
    if not flat or facts.discrete or facts.unenumerable:
        return None
    point = {}
    for name in facts.continuous:
        support = facts.trace.nodes[name]["fn"].support
        point[name] = biject_to(support).inv(draws[name].double()).mean(0)
    sizes = [point[n].numel() for n in flat]
    if sum(sizes) > MAX_COORDINATES:
        return None
    start = torch.cat([point[n].reshape(-1) for n in flat])

    def log_joint(flat_vector: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, size in zip(flat, sizes, strict=True):
            values[name] = flat_vector[offset:offset + size].reshape(point[name].shape)
            offset += size
        values = {n: values.get(n, point[n])[None] for n in facts.continuous}
        return evaluate(model, data, facts, values, unconstrained=True, path=path).total[0]

    hessian = torch.autograd.functional.hessian(log_joint, start)
    if not bool(torch.isfinite(hessian).all()):
        return None
    curvature, vectors = np.linalg.eigh(-hessian.numpy())
    largest = float(np.abs(curvature).max())
    threshold = RELATIVE_CURVATURE.get(facts.dtype, RELATIVE_CURVATURE[torch.float32])
    if largest == 0 or abs(curvature[0]) > threshold * largest:
        return None
    labels = [f"{n}[{i}]" if size > 1 else n for n, size in zip(flat, sizes, strict=True)
              for i in range(size)]
    vector = vectors[:, 0] * np.sign(vectors[np.abs(vectors[:, 0]).argmax(), 0])
    terms = [f"{'-' if w < 0 else '+'} {abs(w):.2f}*{label}"
             for w, label in zip(vector, labels, strict=True) if abs(w) > 0.05]
    return {"sites": flat, "direction": " ".join(terms).removeprefix("+ "),
            "curvature": float(curvature[0]), "largest": largest}
