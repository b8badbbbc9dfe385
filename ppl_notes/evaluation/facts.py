"""A story's facts, worked out once per ``infer()`` call and shared by every part of it.

The checks, the back ends and the ArviZ converter all need the same things about a story
on its data: its sites (latent continuous, latent discrete, observed, deterministic),
their shapes and supports, the plates, the deepest plate nesting (where enumeration
starts), whether a pointwise log-likelihood exists, and how a batch of draws can be
evaluated (the *path*, see :mod:`ppl_notes.evaluation.paths`). :func:`story_facts` reads
them from one run of the story; nothing is cached behind the caller's back: ``infer()``
reads them once and passes them down (:class:`~ppl_notes.evaluation.context.RunContext`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.distributions.transforms import biject_to

from ppl_notes._sites import (
    deterministic_sites,
    is_enumerable,
    sample_sites,
    trace_model,
    trace_plate_nesting,
)
from ppl_notes.evaluation.handlers import run_dtype

__all__ = ["StoryFacts", "story_facts", "story_dtype"]


@dataclass
class StoryFacts:
    """What one trace of a story on its data says, and the vectorisation path chosen.

    Attributes
    ----------
    plate_nesting : int
        The deepest plate nesting; enumeration uses the dims left of it.
    continuous, discrete, observed, likelihood, deterministic : tuple of str
        Latent sites fitted by gradients; latent sites with a finite support, summed
        out by enumeration; every observed site (data, ``pyro.factor``); the story's
        declared observed sites (the pointwise log-likelihood's); ``pyro.deterministic``
        sites.
    unenumerable : tuple of str
        Latent discrete sites with an infinite support (Poisson...).
    value_shapes, batch_shapes, unconstrained_shapes : dict
        Per site: the shape of one value, of its distribution's batch, and (continuous
        sites) of its value mapped to the unconstrained space.
    batch_ndim : dict
        Per site, ``len(batch_shape)``.
    supports : dict
        Per sample site, the support constraint of its distribution at this trace.
    plates : dict
        Per sample site, the names of the plates it is in.
    pointwise_note : str or None
        Why no pointwise log-likelihood exists (a global discrete site couples every
        observation); ``None`` where it does.
    local_discrete : bool
        Every discrete site is local to the one observed site (one value per
        observation), so each observation's likelihood is a sum over its own values.
    pointwise_skipped : str or None
        Why the pointwise log-likelihood, which exists, is not computed and stored: over
        the budget of :func:`~ppl_notes.evaluation.log_likelihood_budget.keep_pointwise`,
        or not asked for; ``None`` where it is stored.
    dtype : torch.dtype
        The dtype the story runs in.
    path : str or None
        ``"plate"``, ``"vmap"`` or ``"loop"`` once :func:`~ppl_notes.evaluation.paths.
        choose_path` has decided.
    elements_per_draw : (int, int) or None
        Tensor elements one draw's enumerated evaluation creates, over all sample sites
        and in the largest, once measured
        (:func:`~ppl_notes.evaluation.density.draws_per_batch`).
    subsampled : dict
        The plates that draw a mini-batch (``pyro.plate(name, size, subsample_size=m)``):
        ``{name: (m, size)}``.
    check_points : dict
        Prior draws already taken by :func:`~ppl_notes.evaluation.paths.check_points`,
        by ``(count, seed)``: choosing the path and checking a compiled potential use the
        same ones.
    prior_draws : dict
        The continuous sites, unconstrained and draws first, at the data checks' prior
        draws whose image is finite (:func:`~ppl_notes.evaluation.paths.
        keep_check_points`; seeded by ``infer()``'s seed): SVI's restarts start there.
    value_branch : str or None
        Where the story reads a value computed from its parameters into Python (a branch
        such as ``if mu > 0:``), found by the path choice: such a story is evaluated one
        draw at a time (:func:`~ppl_notes.evaluation.paths.value_branch`).
    check_gradient : tuple or None
        ``(path, total, gradient)``: the unconstrained log density at the check points
        (``check_points`` ``(3, 0)``) on the chosen path and its gradient by site, from
        the path choice, which the compiled potential's check compares with rather than
        running the story again. None where it could not be differentiated.
    """

    plate_nesting: int
    continuous: tuple[str, ...]
    discrete: tuple[str, ...]
    observed: tuple[str, ...]
    likelihood: tuple[str, ...]
    deterministic: tuple[str, ...]
    unenumerable: tuple[str, ...]
    value_shapes: dict[str, tuple[int, ...]]
    batch_shapes: dict[str, tuple[int, ...]]
    unconstrained_shapes: dict[str, tuple[int, ...]]
    batch_ndim: dict[str, int]
    supports: dict[str, Any]
    plates: dict[str, tuple[str, ...]]
    pointwise_note: str | None
    local_discrete: bool
    dtype: torch.dtype
    trace: Any = field(repr=False, compare=False, default=None)
    path: str | None = None
    path_reason: str = ""
    value_branch: str | None = None
    elements_per_draw: tuple[int, int] | None = None
    subsampled: dict = field(default_factory=dict)
    pointwise_skipped: str | None = None
    check_points: dict = field(repr=False, compare=False, default_factory=dict)
    check_gradient: tuple | None = field(repr=False, compare=False, default=None)
    prior_draws: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def latent(self) -> tuple[str, ...]:
        """Every latent site, in the story's order."""
        return tuple(n for n in self.value_shapes
                     if n in self.continuous or n in self.discrete or n in self.unenumerable)


def story_dtype(model) -> torch.dtype:
    """The dtype a story runs in: its own ``dtype`` (float64 unless it says otherwise)."""
    return getattr(model, "dtype", None) or torch.float64


def _pointwise(sites, discrete, observed, likelihood) -> tuple[str | None, bool]:
    if not discrete:
        return None, False
    plates = {n: {f.name for f in sites[n]["cond_indep_stack"]} for n in discrete + observed}
    if len(observed) != 1 or len(likelihood) != 1:
        return ("the pointwise log-likelihood with discrete latent sites needs exactly one "
                f"observed site; this story has {list(observed)}"), False
    global_sites = [d for d in discrete if plates[d] != plates[observed[0]]]
    if global_sites:
        return (f"discrete site(s) {global_sites} are not in the plates of {observed[0]!r} "
                f"({sorted(plates[observed[0]])}): each draw of them couples every "
                "observation, so the log-likelihood does not split into one term per "
                "observation (LOO and WAIC are undefined); the total log density is "
                "still exact"), False
    return None, True


def story_facts(model, data: Mapping[str, Any], trace=None) -> StoryFacts:
    """The facts of ``model`` on ``data``, read from ``trace`` (one run of it when not given).

    Nothing is remembered between calls: ``infer()`` works them out once, from the run
    that checked the data, and hands them down in its
    :class:`~ppl_notes.evaluation.context.RunContext`; a :class:`~ppl_notes.Posterior`
    keeps those of its own fit.
    """
    dtype = story_dtype(model)
    with run_dtype(dtype), torch.no_grad():
        trace = trace_model(model, data, 0) if trace is None else trace
        sites = sample_sites(trace)
        determ = deterministic_sites(trace)
        latent = {n: s for n, s in sites.items()
                  if not s["is_observed"] and not s["infer"].get("is_auxiliary")}
        discrete = tuple(n for n, s in latent.items() if is_enumerable(s["fn"]))
        unenumerable = tuple(n for n, s in latent.items()
                             if s["fn"].support.is_discrete and n not in discrete)
        continuous = tuple(n for n in latent if n not in discrete and n not in unenumerable)
        observed = tuple(n for n, s in sites.items() if s["is_observed"])
        likelihood = tuple(n for n in getattr(model, "observed", ()) if n in observed)
        unconstrained = {n: tuple(biject_to(latent[n]["fn"].support).inv(latent[n]["value"])
                                  .shape) for n in continuous}
    note, local = _pointwise(sites, discrete, observed, likelihood)
    value_shapes = {n: tuple(s["value"].shape) for n, s in sites.items()}
    value_shapes.update({n: tuple(s["value"].shape) for n, s in determ.items()})
    return StoryFacts(
        plate_nesting=trace_plate_nesting(trace),
        continuous=continuous, discrete=discrete, observed=observed, likelihood=likelihood,
        deterministic=tuple(determ), unenumerable=unenumerable,
        value_shapes=value_shapes,
        batch_shapes={n: tuple(s["fn"].batch_shape) for n, s in sites.items()},
        unconstrained_shapes=unconstrained,
        batch_ndim={n: len(s["fn"].batch_shape) for n, s in sites.items()},
        supports={n: s["fn"].support for n, s in sites.items()},
        plates={n: tuple(f.name for f in s["cond_indep_stack"]) for n, s in sites.items()},
        pointwise_note=note, local_discrete=local, dtype=dtype, trace=trace,
        subsampled=subsampled_plates(trace),
    )


def subsampled_plates(trace) -> dict[str, tuple[int, int]]:
    """``{plate: (subsample size, size)}`` for each plate of ``trace`` that subsamples."""
    found = {}
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            full = getattr(frame, "full_size", None)
            if full is not None and frame.size is not None and frame.size < full:
                found[frame.name] = (int(frame.size), int(full))
    return found
