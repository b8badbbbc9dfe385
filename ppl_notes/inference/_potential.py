r"""A story's potential energy on a batch of flat, unconstrained float64 vectors.

NUTS needs :math:`U(q) = -\log p(x, T(q)) - \log|\det J_T(q)|` and its gradient, where
:math:`T` maps the unconstrained space onto each latent site's support
(``biject_to(support)``, as Pyro and Stan do). Here one call evaluates it for a whole
batch of chains: the story runs once inside a plate over the chains, local discrete sites
are summed out exactly (:func:`~ppl_notes.inference._draws.log_joint`), and the
computation is traced once with :func:`torch.jit.trace`, so each later call runs a fixed
graph without Pyro's per-call bookkeeping. Where the story's discrete sites are not local
to its observations, Pyro's own potential (``initialize_model``) is called chain by chain.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible, init_to_sample
from pyro.infer.mcmc.util import initialize_model

from ppl_notes._sites import sample_sites, trace_model
from ppl_notes.errors import InferenceError
from ppl_notes.inference._compile import capture
from ppl_notes.inference._draws import layout_of, log_joint


def _compile_value_and_grad(potential, example: torch.Tensor):
    """Capture potential and gradient as one aten graph, then compile it with inductor."""

    def value_and_grad(x):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = potential(x)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad.detach()

    return capture(value_and_grad, example)


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
            return init_to_feasible(site)
        if torch.isnan(value).any() or not bool(site["fn"].support.check(value).all()):
            return init_to_feasible(site)
    return value


logger = logging.getLogger(__name__)

INIT_STRATEGIES = {"median": init_to_prior_median, "sample": init_to_sample}


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
    compiler : {"inductor", "torchscript", "none"}
        How the computation is compiled: ``"inductor"`` captures potential and gradient
        as one graph of tensor operations (``make_fx``) and compiles it to fused C++ with
        ``torch.compile`` (seconds to compile, then several times faster per call);
        ``"torchscript"`` traces the potential with :func:`torch.jit.trace` and
        differentiates it with autograd; ``"none"`` runs Pyro every call.
    """

    def __init__(self, model, data: Mapping[str, Any], num_chains: int,
                 compiler: str = "torchscript"):
        self.model, self.data, self.num_chains = model, dict(data), num_chains
        self.layout = layout_of(model, data)
        trace = trace_model(model, data, 0)
        sites = sample_sites(trace)
        self.names = list(self.layout.continuous)
        self.transforms = {n: biject_to(sites[n]["fn"].support) for n in self.names}
        with torch.no_grad():
            self.shapes = {n: tuple(self.transforms[n].inv(sites[n]["value"]).shape)
                           for n in self.names}
        self.sizes = [int(np.prod(self.shapes[n], dtype=int)) for n in self.names]
        self.dim = sum(self.sizes)
        self.uses_pyro_potential = self.layout.pointwise_error is not None
        if self.uses_pyro_potential:
            self._pyro_potential = self._build_pyro_potential()
        self._fn = self._potential
        self._value_and_grad = None
        self.compiler = "none" if self.uses_pyro_potential else compiler
        example = torch.zeros(num_chains, self.dim, dtype=torch.float64)
        if self.compiler == "inductor":
            try:
                self._value_and_grad = _compile_value_and_grad(self._potential, example)
            except Exception as error:  # noqa: BLE001 - any compiler failure: say so, use TorchScript
                logger.warning("torch.compile failed for story %r (%s: %s); using TorchScript",
                               getattr(model, "name", model), type(error).__name__, error)
                self.compiler = "torchscript"
        if self.compiler == "torchscript":
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                self._fn = torch.jit.trace(self._potential, (example,), check_trace=False)

    def _build_pyro_potential(self):
        _, potential_fn, _, _ = initialize_model(
            self.model, model_kwargs=self.data, max_plate_nesting=self.layout.plate_nesting)
        return potential_fn

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

        A float64 tensor passes through as is, so gradients flow to it.
        """
        sites = self.unflatten(torch.as_tensor(flat_draws, dtype=torch.float64))
        return {n: self.transforms[n](v) for n, v in sites.items()}

    def unconstrain(self, values: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Map constrained draws (draws first) to ``(draws, dim)`` unconstrained vectors."""
        pieces = [self.transforms[n].inv(values[n]).reshape(values[n].shape[0], -1)
                  for n in self.names]
        return torch.cat(pieces, dim=-1).double().numpy()

    # -- the potential ----------------------------------------------------------------
    def _potential(self, flat: torch.Tensor) -> torch.Tensor:
        batch = flat.shape[0]
        values, log_det = {}, torch.zeros(batch, dtype=flat.dtype)
        for name, unconstrained in self.unflatten(flat).items():
            transform = self.transforms[name]
            value = transform(unconstrained)
            values[name] = value
            jacobian = transform.log_abs_det_jacobian(unconstrained, value)
            log_det = log_det + jacobian.reshape(batch, -1).sum(-1)
        total, _ = log_joint(self.model, self.data, values, self.layout)
        return -(total + log_det)

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Potentials ``(batch,)`` and gradients ``(batch, dim)`` at ``positions``."""
        if self.uses_pyro_potential:
            return self._call_pyro(positions)
        if self._value_and_grad is not None:
            value, grad = self._value_and_grad(torch.from_numpy(np.ascontiguousarray(positions)))
            return value.numpy(), grad.numpy()
        x = torch.from_numpy(np.ascontiguousarray(positions)).requires_grad_(True)
        value = self._fn(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach().numpy(), grad.numpy()

    def _call_pyro(self, positions):
        values, grads = [], []
        for row in positions:
            x = torch.from_numpy(row.copy()).requires_grad_(True)
            sites = {n: v[0] for n, v in self.unflatten(x[None]).items()}
            value = self._pyro_potential(sites)
            (grad,) = torch.autograd.grad(value, x)
            values.append(float(value.detach()))
            grads.append(grad.numpy())
        return np.array(values), np.stack(grads)

    def initial_points(self, init: str, seeds: list[int]) -> np.ndarray:
        """One starting point per seed, by the named init strategy, unconstrained."""
        strategy = INIT_STRATEGIES[init]
        points = []
        for seed in seeds:
            pyro.set_rng_seed(seed)
            with torch.no_grad():
                trace = poutine.trace(InitMessenger(strategy)(self.model)).get_trace(**self.data)
                values = {n: self.transforms[n].inv(trace.nodes[n]["value"]) for n in self.names}
            point = self.flatten(values)
            value, _ = self(np.repeat(point[None], self.num_chains, axis=0))
            if not np.isfinite(value[0]):
                culprits = self._non_finite_sites(values)
                where = f" (at sites {culprits})" if culprits else ""
                raise InferenceError(
                    f"NUTS cannot start: the log density of story "
                    f"{getattr(self.model, 'name', '')!r} is not finite{where} at the starting "
                    f"point {self._describe(values)}; check the priors and the data, or pass "
                    "init='sample'"
                )
            points.append(point)
        return np.stack(points)

    def _non_finite_sites(self, values) -> list[str]:
        """The sample sites whose log density is not finite at these (unconstrained) values."""
        constrained = {n: self.transforms[n](v) for n, v in values.items()}
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(self.model, data=constrained)).get_trace(
                **self.data)
            bad = []
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                log_prob = site["fn"].log_prob(site["value"])
                if not bool(torch.isfinite(log_prob).all()):
                    bad.append(name)
        return bad

    def _describe(self, values) -> str:
        return ", ".join(f"{n}={self.transforms[n](v).tolist()}" for n, v in values.items())
