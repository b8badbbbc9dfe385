"""A story's potential energy as a function of one flat, unconstrained float64 vector.

Pyro's :func:`~pyro.infer.mcmc.util.initialize_model` builds the potential
:math:`U(\\theta) = -\\log p(x, \\theta) - \\log|J|` on the unconstrained space, with
enumerated discrete sites summed out exactly. We flatten its dict of sites into one
vector and trace the whole computation once with :func:`torch.jit.trace`, so each
gradient afterwards runs a fixed graph without Pyro's per-call bookkeeping.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_sample
from pyro.infer.mcmc.util import initialize_model

from ppl_notes._sites import guess_max_plate_nesting
from ppl_notes.errors import InferenceError



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


_INIT_STRATEGIES = {"median": init_to_prior_median, "sample": init_to_sample}


class FlatPotential:
    """Potential energy and its gradient on a flat unconstrained vector.

    Parameters
    ----------
    model : callable
        The story.
    data : dict
        Prepared data (keyword arguments of the story).
    init : {"median", "sample"}
        How each chain's starting point is chosen (Pyro's init strategies).
    seed : int
        Seed for the starting point.
    jit : bool
        Trace the potential with TorchScript (the fast path) or call Pyro each time.
    """

    def __init__(self, model, data: Mapping[str, Any], init: str = "median", seed: int = 0,
                 jit: bool = True) -> None:
        self.max_plate_nesting = guess_max_plate_nesting(model, data)
        pyro.set_rng_seed(seed)
        try:
            initial, potential_fn, transforms, trace = initialize_model(
                model,
                model_kwargs=dict(data),
                max_plate_nesting=self.max_plate_nesting,
                init_strategy=_INIT_STRATEGIES[init],
            )
        except (RuntimeError, ValueError) as error:
            raise InferenceError(f"NUTS could not find a starting point: {error}") from error
        self.transforms = transforms
        self.names = list(initial)
        self.shapes = {name: tuple(initial[name].shape) for name in self.names}
        self.sizes = [int(np.prod(self.shapes[n], dtype=int)) for n in self.names]
        self.dim = sum(self.sizes)
        self.initial = self.flatten({k: v.detach() for k, v in initial.items()})
        self._potential_fn = potential_fn
        self._fn = self._potential
        if jit:
            example = torch.as_tensor(self.initial)
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                self._fn = torch.jit.trace(self._potential, (example,), check_trace=False)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector (or a batch of them, draws first) into sites."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: p.reshape(lead + self.shapes[n]) for n, p in zip(self.names, pieces)}

    def flatten(self, values: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Join site values into one float64 vector."""
        return np.concatenate(
            [values[n].detach().double().reshape(-1).cpu().numpy() for n in self.names]
        )

    def _potential(self, flat: torch.Tensor) -> torch.Tensor:
        return self._potential_fn(self.unflatten(flat))

    def __call__(self, position: np.ndarray) -> tuple[float, np.ndarray]:
        """Potential energy and its gradient at ``position``."""
        x = torch.from_numpy(position).requires_grad_(True)
        value = self._fn(x)
        (grad,) = torch.autograd.grad(value, x)
        return float(value.detach()), grad.numpy()

    def constrain(self, flat_draws: np.ndarray) -> dict[str, torch.Tensor]:
        """Map unconstrained draws (draws first) to each site's support."""
        sites = self.unflatten(torch.as_tensor(flat_draws))
        return {n: self.transforms[n].inv(v) for n, v in sites.items()}
