"""Choose how a batch of draws is evaluated: decided by checking, never assumed.

A story is evaluated at a few draws from its prior one draw at a time (the ``"loop"``
path: exactly what its author wrote); then the vectorised paths are tried on the same
draws in order of speed, ``"plate"`` (Pyro's vectorised plates; right only for a story
written batch-aware) and ``"vmap"`` (:func:`torch.func.vmap` over the one-draw story).
The first whose log density, pointwise log-likelihood, deterministic and constrained
values all equal the one-draw ones is kept; when none does, every draw is evaluated on
its own. The reason each path was passed over is kept in ``StoryFacts.path_reason``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from pyro.distributions.transforms import biject_to

from ppl_notes._sites import trace_model
from ppl_notes.evaluation.density import Evaluation, evaluate
from ppl_notes.evaluation.facts import StoryFacts
from ppl_notes.evaluation.handlers import run_dtype
from ppl_notes.evaluation.value_branches import PointDependence

__all__ = ["choose_path", "check_points", "keep_check_points", "value_branch"]

logger = logging.getLogger(__name__)

#: How many prior draws the paths are compared at.
CHECK_POINTS = 3
#: Relative and absolute tolerance of the comparison (float64 rounding of reordered sums).
RTOL, ATOL = 1e-6, 1e-8


def check_points(model, data: Mapping[str, Any], facts: StoryFacts, count: int = CHECK_POINTS,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """``count`` prior draws of the continuous sites, unconstrained, draws first.

    Draws whose unconstrained image is not finite (a value on a boundary) are skipped;
    :func:`~ppl_notes._sites.trace_model` itself redraws where a linear-algebra step fails.
    The draws are kept on ``facts``: the same ones serve every later check.
    """
    if (count, seed) not in facts.check_points:
        facts.check_points[count, seed] = _prior_points(model, data, facts, count, seed)
    return dict(facts.check_points[count, seed])


def keep_check_points(facts: StoryFacts, runs: list) -> None:
    """Take the prior check points from runs of the story made already (the data checks').

    ``runs`` are traces of the story at prior draws (:func:`ppl_notes.checks.check_data_runs`
    makes seven): those with a finite unconstrained image are kept as
    ``facts.prior_draws``, and their first :data:`CHECK_POINTS` serve as
    :func:`check_points` ``(seed=0)``, so that the path choice and the compiled
    potential's check run the story no more to draw them. Fewer usable runs: no check
    points are kept, and they are drawn when first asked for.
    """
    with run_dtype(facts.dtype), torch.no_grad():
        points = _points_of(runs, facts, len(runs))
    facts.prior_draws = points
    if points and len(next(iter(points.values()))) >= CHECK_POINTS:
        facts.check_points.setdefault((CHECK_POINTS, 0),
                                      {n: v[:CHECK_POINTS] for n, v in points.items()})


def _points_of(runs, facts: StoryFacts, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` runs' continuous sites, unconstrained, where all are finite."""
    points = [p for trace in runs if (p := _unconstrained(trace, facts)) is not None]
    return _stacked(points[:count], facts)


def _unconstrained(trace, facts: StoryFacts) -> dict[str, torch.Tensor] | None:
    if any(n not in trace.nodes for n in facts.continuous):  # a run of another branch
        return None
    point = {n: biject_to(trace.nodes[n]["fn"].support).inv(trace.nodes[n]["value"])
             for n in facts.continuous}
    return point if all(bool(torch.isfinite(v).all()) for v in point.values()) else None


def _stacked(points: list[dict[str, torch.Tensor]], facts: StoryFacts) -> dict[str, torch.Tensor]:
    if not points or not facts.continuous:
        return {}
    return {n: torch.stack([p[n] for p in points]) for n in facts.continuous}


def _prior_points(model, data, facts: StoryFacts, count: int, seed: int):
    points, attempt = [], 0
    with run_dtype(facts.dtype), torch.no_grad():
        while len(points) < count and attempt < 10 * count:
            point = _unconstrained(trace_model(model, data, seed + 7919 * attempt), facts)
            attempt += 1
            if point is not None:
                points.append(point)
        return _stacked(points, facts)


def _agree(got: Evaluation, reference: Evaluation) -> bool:
    def close(a, b):
        return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=RTOL,
                                                           atol=ATOL, equal_nan=True))
    if not close(got.total, reference.total):
        return False
    for part in ("pointwise", "deterministic", "constrained"):
        mine, theirs = getattr(got, part), getattr(reference, part)
        if set(mine) != set(theirs) or not all(close(mine[k], theirs[k]) for k in theirs):
            return False
    return True


def _with_gradient(model, data, facts: StoryFacts, points: dict[str, torch.Tensor], path: str):
    """The evaluation at ``points`` on ``path``, its total's gradient by site, and a branch.

    The compiled potential is later checked against both at the same points
    (:attr:`StoryFacts.check_gradient`), which then needs no run of the story of its
    own. Where the evaluation cannot be differentiated, it is made without gradients and
    the gradient is None: the path is chosen as before either way. On the ``plate``
    path the run is watched for a value of the point read into Python
    (:class:`~ppl_notes.evaluation.value_branches.PointDependence`), the third value:
    where the story reads one, a batch of draws would take one branch for all (vmap
    refuses such a read by itself).
    """
    leaves = {n: v.detach().double().requires_grad_(True) for n, v in points.items()}
    watch = _watch(path, leaves)
    try:
        with torch.enable_grad(), watch:
            got = evaluate(model, data, facts, leaves, unconstrained=True, path=path)
        grads = torch.autograd.grad(got.total.sum(), [leaves[n] for n in facts.continuous],
                                    allow_unused=True)
    except Exception:  # noqa: BLE001 - not differentiable here: evaluated as before
        watch = _watch(path, points)
        with torch.no_grad(), watch:
            got = evaluate(model, data, facts, points, unconstrained=True, path=path)
        return got, None, getattr(watch, "found", None)
    gradient = {n: torch.zeros_like(leaves[n]) if g is None else g
                for n, g in zip(facts.continuous, grads, strict=True)}
    return got, (got.total.detach(), gradient), getattr(watch, "found", None)


def _watch(path: str, point: Mapping[str, torch.Tensor]):
    """A :class:`PointDependence` on ``point`` for the plate path; nothing for the others."""
    return PointDependence(point.values()) if path == "plate" else contextlib.nullcontext()


def value_branch(model, data: Mapping[str, Any], facts: StoryFacts,
                 points: Mapping[str, torch.Tensor]) -> str | None:
    """Where the story reads a value computed from its parameters into Python, or None.

    One draw of ``points``, evaluated as the one-draw story under
    :class:`~ppl_notes.evaluation.value_branches.PointDependence`: a read happens whichever
    way its branch then goes, so one draw finds it. The line is kept as
    ``facts.value_branch``. Run where no batched path evaluates the story as its one-draw
    self (the loop path), to say why; the plate path is watched as it is tried.
    """
    first = {n: v[:1].clone() for n, v in points.items()}
    try:
        with torch.no_grad(), PointDependence(first.values()) as watch:
            evaluate(model, data, facts, first, unconstrained=True, path="loop")
    except Exception:  # noqa: BLE001 - only says why; the loop path is right either way
        return None
    facts.value_branch = watch.found
    return watch.found


#: What torch says where an operation takes one matrix and the plate path gave it a batch
_ONE_MATRIX_ERRORS = ("must be a matrix", "Supports 1D or 2D tensors", "1D tensors expected",
                      "2D tensors expected")
#: The plate path's reason then says how to keep it
_ONE_MATRIX_HINT = ("torch.mm, torch.diag, torch.dot and torch.outer take one matrix or vector,"
                    " not the batch of draws the plate path runs: their batched forms "
                    "(tau[..., :, None] * L for diag(tau) @ L, torch.diag_embed, @, "
                    "torch.einsum) keep the faster plate path")


def choose_path(model, data: Mapping[str, Any], facts: StoryFacts) -> str:
    """The fastest path that evaluates the story as its one-draw self does; see module."""
    if facts.path is not None:
        return facts.path
    points = check_points(model, data, facts)
    if not points:
        facts.path, facts.path_reason = "loop", "no continuous latent sites to vectorise"
        return facts.path
    with torch.no_grad():
        reference = evaluate(model, data, facts, points, unconstrained=True, path="loop")
    candidates = ["plate"] if not facts.discrete or facts.local_discrete else []
    candidates.append("vmap")
    reasons = []
    if "plate" not in candidates:
        reasons.append("plate: the story has global or non-local discrete sites")
    for path in candidates:
        try:
            got, gradient, branch = _with_gradient(model, data, facts, points, path)
        except Exception as error:  # noqa: BLE001 - any failure rules the path out; kept as the reason
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            hint = (f" ({_ONE_MATRIX_HINT})" if path == "plate"
                    and any(m in first for m in _ONE_MATRIX_ERRORS) else "")
            reasons.append(f"{path}: {type(error).__name__}: {first}{hint}")
            continue
        if branch is not None:  # one branch for a whole batch: right only by chance
            reasons.append(f"{path}: the story reads a value computed from its parameters "
                           f"into Python ({branch})")
            continue
        if _agree(got, reference):
            facts.path = path
            facts.check_gradient = None if gradient is None else (path, *gradient)
            break
        reasons.append(f"{path}: differs from the one-draw story at a prior draw")
    else:
        facts.path = "loop"
        branch = value_branch(model, data, facts, points)
        if branch is not None:
            reasons.insert(0, f"the story branches on a value computed from its parameters "
                           f"({branch}): each draw is evaluated on its own and takes its own "
                           "branch; nothing is batched, recorded or compiled, as any of those "
                           "would freeze one branch")
    facts.path_reason = "; ".join(reasons)
    logger.info("story %r is evaluated on the %r path%s", getattr(model, "name", model),
                facts.path, f" ({facts.path_reason})" if reasons else "")
    return facts.path
