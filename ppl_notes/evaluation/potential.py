r"""A story's potential energy on a batch of flat, unconstrained float64 vectors.

NUTS needs :math:`U(q) = -\log p(x, T(q)) - \log|\det J_T(q)|` and its gradient, where
:math:`T` maps the unconstrained space onto each latent site's support
(``biject_to(support)`` of the support the site has at that evaluation, as Pyro, Stan and
NumPyro do). One call evaluates it for a whole batch of chains, on the story's
evaluation path (:mod:`ppl_notes.evaluation`: Pyro's plates for a batch-aware story,
``torch.func.vmap`` over the one-draw story, or one chain at a time), with every
enumerable discrete site summed out exactly. On the batched paths the potential and its
gradient are recorded once as a tape of tensor operations run by a C interpreter
(:mod:`~ppl_notes.native.tape`; no compilation per story), or captured as one graph
and compiled (inductor, or TorchScript for the plate path); the recorded or compiled
computation is checked against the eager one at prior draws before it is used.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger

from ppl_notes._sites import sample_or_dispersed, unconstrained_value
from ppl_notes.checks import blame_invalid_parameter
from ppl_notes.errors import InferenceError, StoryError
from ppl_notes.evaluation import (
    StoryFacts,
    check_points,
    choose_path,
    evaluate,
    run_dtype,
    story_facts,
)
from ppl_notes.evaluation.compile import capture, compiler_available
from ppl_notes.evaluation.density import draws_per_batch, trace_with
from ppl_notes.evaluation.fingerprint import data_digests
from ppl_notes.native.tape import Tape, Unsupported
from ppl_notes.story import Model


def _value_and_grad_of(potential):
    """``x -> (potential(x), its gradient)`` for a batch ``x``, by autograd."""

    def value_and_grad(x):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = potential(x)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad.detach()

    return value_and_grad


def _compile_value_and_grad(potential, example: torch.Tensor):
    """Capture potential and gradient as one aten graph, then compile it with inductor."""
    return capture(_value_and_grad_of(potential), example)


def init_to_prior_median(site, num_samples: int = 15):
    """The coordinate-wise median of prior draws, also for vector-valued sites.

    Pyro's ``init_to_median`` starts every multivariate site at the origin of the
    unconstrained space, which puts a mixture's ordered means at (0, 1): far from any
    data. Here the median of draws is kept whenever it lies in the site's support
    (ordered vectors stay ordered); otherwise the site starts where Pyro's
    ``init_to_feasible`` puts it.
    """
    with torch.no_grad():
        try:
            value = site["fn"].sample(sample_shape=(num_samples,)).median(dim=0).values
        except (RuntimeError, ValueError, NotImplementedError):
            return unconstrained_value(site)
        if torch.isnan(value).any() or not bool(site["fn"].support.check(value).all()):
            return unconstrained_value(site)
    return value


logger = logging.getLogger(__name__)

#: Tapes recorded in this process: story -> {(batch, path, dtype, data digest): tape}
_TAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Where a search or a chain starts: the prior's median, or a prior draw (a dispersed
#: uniform start where the prior cannot be sampled)
INIT_STRATEGIES = {"median": init_to_prior_median, "sample": sample_or_dispersed}


class BatchedPotential:
    """Potential energy and gradient for ``num_chains`` points at once.

    Parameters
    ----------
    model : Model
        The story.
    data : dict
        Prepared data.
    num_chains : int
        The batch size every call uses.
    compiler : {"tape", "inductor", "torchscript", "none"}
        How the computation is compiled on a batched path: ``"tape"`` records potential
        and gradient once as aten operations and runs them in a C interpreter
        (:mod:`~ppl_notes.native.tape`: a fraction of a second to record, no
        compilation; where the story uses an operation the interpreter lacks, inductor
        compiles it instead); ``"inductor"`` captures
        potential and gradient as one graph of tensor operations (``make_fx``) and
        compiles it to fused C++ (seconds to compile, then several times faster per
        call); ``"torchscript"`` traces the potential with :func:`torch.jit.trace` (plate
        path only) and differentiates it with autograd; ``"none"`` runs Pyro every call.
        The one-chain-at-a-time path is never compiled: a story that needs it branches
        on values, which a captured graph would freeze.
    facts : StoryFacts, optional
        The story's facts on ``data``, where the caller has them (its
        :class:`~ppl_notes.evaluation.context.RunContext`'s); read from one run of the
        story otherwise. The evaluation path is decided on them, once.
    """

    def __init__(self, model, data: Mapping[str, Any], num_chains: int,
                 compiler: str = "torchscript", facts: StoryFacts | None = None):
        self.model, self.data, self.num_chains = model, data, num_chains
        self.facts = story_facts(model, data) if facts is None else facts
        self.path = choose_path(model, data, self.facts)
        self.names = list(self.facts.continuous)
        self.shapes = {n: self.facts.unconstrained_shapes[n] for n in self.names}
        #: the maps to the supports at the story's first trace (for starting values given
        #: on the sites' own scale; the potential itself maps with each call's supports)
        self.transforms = {n: biject_to(self.facts.supports[n]) for n in self.names}
        self.sizes = [int(np.prod(self.shapes[n], dtype=int)) for n in self.names]
        self.dim = sum(self.sizes)
        self._fn = self._potential
        self._value_and_grad = None
        self.compiler = compiler_for(self.path, compiler)
        example = torch.zeros(num_chains, self.dim, dtype=torch.float64)
        if self.compiler == "tape":
            self._value_and_grad = self._cached_tape(example)
        if self.compiler == "inductor":
            try:
                self._value_and_grad = _compile_value_and_grad(self._potential, example)
            except Exception as error:  # noqa: BLE001 - any compiler failure: say so, run eager
                logger.warning("compiling the potential of story %r failed (%s: %s); it runs "
                               "uncompiled", getattr(model, "name", model),
                               type(error).__name__, error)
                self.compiler = "none"
        if self.compiler == "torchscript":
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                self._fn = torch.jit.trace(self._potential, (example,), check_trace=False)
        if self.compiler != "none" and not self._compiled_agrees():
            logger.warning("the compiled potential of story %r differs from the story at a "
                           "prior draw (it branches on values?); it runs uncompiled",
                           getattr(model, "name", model))
            self.compiler, self._fn, self._value_and_grad = "none", self._potential, None

    def _cached_tape(self, example: torch.Tensor):
        """The tape this story was recorded as for this data and batch size, in this process.

        SVI and NUTS on one story (``ppl-notes compare``), or a fit repeated with other
        options, record the same potential: the recording (up to seconds for a story with
        a Python loop: arK, the HMM) is kept per story object, keyed by the data's digest,
        the batch size, path and dtype. A stale tape (a constant the story closes over,
        changed since) is caught by the agreement check every potential makes.
        """
        key = (self.num_chains, self.path, str(self.facts.dtype),
               tuple(sorted(data_digests(self.data).items())))
        try:
            recorded = _TAPES.setdefault(self.model, {})
        except TypeError:  # a story that cannot be weakly referenced: no cache
            return self._record_tape(example)
        if key not in recorded:
            tape = self._record_tape(example)
            if tape is None:
                return None
            recorded[key] = tape
        return recorded[key]

    def _record_tape(self, example: torch.Tensor):
        """The potential's tape, or None (and the next compiler) where it cannot be made.

        It is recorded at the origin of the unconstrained space, or, where the story
        raises there (a mixing matrix of zeros that ``torch.linalg.solve`` refuses), at
        the prior check points: a tape is the same operations wherever it is recorded,
        and the agreement check holds it to the story at those points either way.
        """
        try:
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                try:
                    return Tape(_value_and_grad_of(self._potential), example)
                except (RuntimeError, ValueError):
                    at_prior = self._check_batch()
                    if at_prior is None:
                        raise
                    return Tape(_value_and_grad_of(self._potential), torch.from_numpy(at_prior))
        except Unsupported as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001 - a failed recording: say so, compile
            reason = f"{type(error).__name__}: {error}"
        self.compiler = "inductor" if compiler_available() else "none"
        cost = ("inductor compiles it instead: seconds to minutes the first time on a "
                "machine (its cache is kept)" if self.compiler == "inductor" else
                "it runs uncompiled: every gradient runs the story through Pyro, often ten "
                "times slower or more")
        logger.warning("the potential of story %r leaves the tape (%s); %s",
                       getattr(self.model, "name", self.model), reason, cost)
        return None

    def _check_batch(self) -> np.ndarray | None:
        """The prior check points, flat, repeated to a batch of ``num_chains``; None if none."""
        points = check_points(self.model, self.data, self.facts)
        if not points:
            return None
        flat = torch.cat([points[n].reshape(points[n].shape[0], -1) for n in self.names], -1)
        return flat.double()[torch.arange(self.num_chains) % flat.shape[0]].numpy()

    def _compiled_agrees(self) -> bool:
        """Whether the compiled potential equals the eager one at the prior check points."""
        flat = self._check_batch()
        if flat is None:
            return True
        compiled = self(flat)
        eager = self._eager_at_check_points(flat)
        # float64: reordered sums; float32: 64 ulps, the rounding of a long chain of
        # operations that the tape runs in double and rounds (an HMM's gradient differed
        # by 4.8e-7 at 0.44 over 100 time steps)
        rtol = max(1e-6, 64 * torch.finfo(self.facts.dtype).eps)
        return all(np.allclose(a, b, rtol=rtol, atol=1e-8, equal_nan=True)
                   for a, b in zip(compiled, eager, strict=True))

    def _eager_at_check_points(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The eager potential and gradient at the check batch ``flat``.

        The path choice evaluated the story, and its gradient, at the same points on the
        same path (:attr:`StoryFacts.check_gradient`): those are read back, and the story
        runs again only where they are missing.
        """
        stored = self.facts.check_gradient
        if stored is None or stored[0] != self.path:
            return _eager_value_and_grad(self._potential, flat)
        _, total, gradient = stored
        rows = torch.arange(self.num_chains) % total.shape[0]
        grad = torch.cat([gradient[n].reshape(total.shape[0], -1) for n in self.names], -1)
        return (-total.double()[rows]).numpy(), (-grad.double()[rows]).numpy()

    # -- flat <-> sites ---------------------------------------------------------------
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``(batch, dim)`` unconstrained vectors into sites."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: p.reshape(lead + self.shapes[n])
                for n, p in zip(self.names, pieces, strict=True)}

    def flatten(self, values: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Unconstrained site values (no batch dim) -> one float64 vector."""
        return np.concatenate(
            [values[n].detach().double().reshape(-1).cpu().numpy() for n in self.names])

    def constrain(self, flat_draws: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Map unconstrained draws ``(draws, dim)`` to each site's support.

        The story is run, so a support that depends on another site is honoured. A float64
        tensor passes through as is, so gradients flow to it; arrays are mapped in chunks.
        """
        flat = torch.as_tensor(flat_draws, dtype=torch.float64)
        if flat.requires_grad:
            return self._evaluate(flat, density=False).constrained
        pieces = self._in_chunks(flat, density=False)
        return {n: torch.cat([p.constrained[n] for p in pieces]) for n in pieces[0].constrained}

    def unconstrained_log_density(self, flat_draws: np.ndarray | torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x, T(u)) + \log|\det J_T(u)|` at many points, without gradients.

        The density of the unconstrained point itself (the negated potential), from one
        run of the story per chunk: its ratio to a density :math:`q(u)` on the same space
        is an importance ratio (:mod:`ppl_notes.vi.importance`).
        """
        return torch.cat([p.total for p in self._in_chunks(flat_draws, density=True)])

    def _in_chunks(self, flat_draws: np.ndarray | torch.Tensor, density: bool) -> list:
        flat = torch.as_tensor(flat_draws, dtype=torch.float64)
        chunk = draws_per_batch(self.model, self.data, self.facts, flat.shape[0])
        with torch.no_grad():
            return [self._evaluate(flat[i:i + chunk], density=density)
                    for i in range(0, flat.shape[0], chunk)]

    # -- the potential ----------------------------------------------------------------
    def _evaluate(self, flat: torch.Tensor, jacobian: bool = True, priors: bool = True,
                  density: bool = True):
        return evaluate(self.model, self.data, self.facts, self.unflatten(flat),
                        unconstrained=True, path=self.path, jacobian=jacobian, priors=priors,
                        density=density)

    def _potential(self, flat: torch.Tensor) -> torch.Tensor:
        return -self._evaluate(flat).total

    def log_density(self, flat: torch.Tensor, priors: bool = True) -> torch.Tensor:
        r"""Differentiable log density at ``(batch, dim)`` unconstrained points.

        :math:`\log p(x, \theta)`, or :math:`\log p(x \mid \theta)` with ``priors=False``,
        without the Jacobian: the density of the sites themselves, whose mode MAP and MLE
        seek.
        """
        return self._evaluate(flat, jacobian=False, priors=priors).total

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Potentials ``(batch,)`` and gradients ``(batch, dim)`` at ``positions``.

        A point where the story raises (a Cholesky factor of a matrix that is not
        positive definite at an extreme length scale) gets an infinite potential, as
        Stan rejects a proposal whose log density throws: the sampler counts it as a
        divergence and the other chains of the batch go on.
        """
        try:
            if self.compiler == "tape":
                return self._value_and_grad.evaluate(positions)
            if self._value_and_grad is not None:
                value, grad = self._value_and_grad(
                    torch.from_numpy(np.ascontiguousarray(positions)))
                return value.numpy(), grad.numpy()
            return _eager_value_and_grad(self._fn, positions)
        except StoryError:  # the story itself is wrong (its sites change): never a point's
            raise
        except (RuntimeError, ValueError) as error:
            return self._point_by_point(positions, error)

    def native(self) -> tuple[int, int] | None:
        """The potential as a C function for the C NUTS transitions (a tape's), or None."""
        return self._value_and_grad.native() if self.compiler == "tape" else None

    def _point_by_point(self, positions: np.ndarray, error: Exception):
        """Each point alone (uncompiled): those that raise get potential +inf."""
        values = np.full(positions.shape[0], np.inf)
        grads = np.zeros_like(positions, dtype=float)
        for i in range(positions.shape[0]):
            try:
                value, grad = _eager_value_and_grad(self._potential, positions[i:i + 1])
            except StoryError:
                raise
            except (RuntimeError, ValueError):
                continue
            values[i], grads[i] = value[0], grad[0]
        if not np.isfinite(values).any():
            logger.debug("potential of %r raised at every point of a batch: %s",
                         getattr(self.model, "name", self.model), error)
        return values, grads

    def initial_points(self, init: str, seeds: list[int], method: str = "NUTS") -> np.ndarray:
        """One starting point per seed, by the named init strategy, unconstrained.

        ``method`` names the fit in the error raised where the density is not finite at
        a start.
        """
        strategy = INIT_STRATEGIES[init]
        points = []
        for seed in seeds:
            with torch.no_grad(), run_dtype(self.facts.dtype):
                trace = self._starting_trace(strategy, init, seed)
                values = {n: biject_to(trace.nodes[n]["fn"].support).inv(trace.nodes[n]["value"])
                          .double() for n in self.names}
            point = self.flatten(values)
            value, _ = self(np.repeat(point[None], self.num_chains, axis=0))
            if not np.isfinite(value[0]):
                try:
                    culprits = self._non_finite_sites(values)
                except (RuntimeError, ValueError):  # the story raises there (see __call__)
                    culprits = []
                where = f" (at sites {culprits})" if culprits else ""
                raise InferenceError(
                    f"{method} cannot start: the log density of story "
                    f"{getattr(self.model, 'name', '')!r} is not finite{where} at the starting "
                    f"point {self._describe(trace)}; check the priors and the data, or pass "
                    "init='sample'"
                )
            points.append(point)
        return np.stack(points)

    def drawn_starts(self, count: int) -> list[np.ndarray]:
        """Up to ``count`` starting points from the prior draws the data checks made.

        ``facts.prior_draws`` (:func:`~ppl_notes.evaluation.paths.keep_check_points`),
        in their order, where the potential is finite: starts from the prior, as
        :meth:`initial_points` ``("sample")`` draws them, without a run of the story
        each. An empty list for a potential of other sites (a story's hand-marginalised
        form).
        """
        draws = self.facts.prior_draws
        if not draws or set(draws) != set(self.names):
            return []
        points = []
        for i in range(len(next(iter(draws.values())))):
            if len(points) == count:
                break
            point = self.flatten({n: draws[n][i] for n in self.names})
            if np.isfinite(self(np.repeat(point[None], self.num_chains, axis=0))[0][0]):
                points.append(point)
        return points

    def _starting_trace(self, strategy, init: str, seed: int, tries: int = 10):
        """The story run at a starting point.

        A start where the story raises (a prior draw, or the median, in a region where
        a transform is NaN) is replaced by prior draws, up to ``tries`` of them; where
        every one raises, the story's line is named.
        """
        for attempt in range(tries):
            pyro.set_rng_seed(seed + 1_000_003 * attempt)
            chosen = strategy if attempt == 0 else INIT_STRATEGIES["sample"]
            try:
                return poutine.trace(InitMessenger(chosen)(self.model)).get_trace(
                    **self.data)
            except (ValueError, RuntimeError) as error:
                failure = error
        # a prior that lets a parameter leave its domain: name the line
        if isinstance(self.model, Model):
            blame_invalid_parameter(self.model, failure, self.data)
        raise InferenceError(
            f"the story {getattr(self.model, 'name', '')!r} raises at its starting point "
            f"({init}): {str(failure).splitlines()[0]}") from failure

    def _non_finite_sites(self, values) -> list[str]:
        """The sample sites whose log density is not finite at these (unconstrained) values."""
        with torch.no_grad(), pyro.validation_enabled(False), run_dtype(self.facts.dtype):
            trace, _, _ = trace_with(self.model, self.data, self.facts, values, True)
        return [name for name, site in trace.nodes.items() if site["type"] == "sample"
                and not bool(torch.isfinite(site["log_prob"]).all())]

    def _describe(self, trace) -> str:
        return ", ".join(f"{n}={trace.nodes[n]['value'].tolist()}" for n in self.names)


class ChunkedPotential:
    """A :class:`BatchedPotential` called on any number of points, a batch at a time.

    The potential is recorded for batches of its ``num_chains`` points; the last batch is
    padded with copies.

    ``evaluations`` counts the points evaluated (gradient evaluations): VI's cost.
    """

    def __init__(self, potential: BatchedPotential):
        self.potential, self.size, self.evaluations = potential, potential.num_chains, 0

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Potentials (n,) and gradients (n, d) of ``points`` (n, d)."""
        values, grads = [], []
        for at in range(0, points.shape[0], self.size):
            block = points[at:at + self.size]
            short = self.size - block.shape[0]
            if short:
                block = np.concatenate([block, np.repeat(block[:1], short, axis=0)])
            value, grad = self.potential(np.ascontiguousarray(block))
            values.append(np.array(value[:self.size - short]))
            grads.append(np.array(grad[:self.size - short]))
        self.evaluations += points.shape[0]
        return np.concatenate(values), np.concatenate(grads)


def compiler_for(path: str, requested: str) -> str:
    """The compiler a path can use: none for one chain at a time, TorchScript for plates."""
    if path == "loop" or (requested == "torchscript" and path != "plate"):
        return "none"
    return requested


def _eager_value_and_grad(potential, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.ascontiguousarray(positions)).requires_grad_(True)
    value = potential(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach().numpy(), grad.numpy()
