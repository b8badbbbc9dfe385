r"""Normalising flows over the unconstrained space, each started at a fitted Gaussian.

Each flow is Real-NVP (Dinh, Sohl-Dickstein & Bengio 2017) built from Pyro's own
:class:`~pyro.distributions.transforms.AffineCoupling` layers, in the whitened
coordinates of a full-rank Gaussian :math:`\mathcal N(\mu, LL^\top)`:

.. math:: z = \mu + L\,T(\varepsilon), \qquad \varepsilon \sim \mathcal N(0, I), \qquad
          T = S \circ C_K \circ P_K \circ \dots \circ C_1 \circ P_1,

each :math:`C_k` an affine coupling (half of the coordinates pass through and set the
shift and log-scale of the other half, by a small network), each :math:`P_k` a fixed
permutation, so that every coordinate is moved by every other one within two layers, and
:math:`S` an elementwise sinh-arcsinh layer (:class:`SinhArcsinh`) for skewed and heavy
tails, which affine couplings on a Gaussian cannot make. Its log density is

.. math:: \log q(z) = \log\mathcal N(\varepsilon; 0, I) - \log|\det J_T(\varepsilon)|
          - \log|L|, \qquad \varepsilon = T^{-1}(L^{-1}(z - \mu)),

exact in both directions (each coupling inverts in closed form). The networks' last
layers start at zero, so each flow starts as its Gaussian: the Gaussian VI fit of
:mod:`~ppl_notes.vi.gaussian_vi` is its base, and the layers learn only what the
Gaussian misses. A funnel's scale that grows with another coordinate is one coupling's
log-scale, a function of that coordinate (Agrawal, Sheldon & Domke 2020 fit Real-NVP
the same way, on 29 Stan models, from scratch).

Restarts are flows of their own, with their own Gaussians and parameters, held in one
:class:`Flows`: each network's weights carry a leading restart dimension and every layer
runs all restarts in one batched product (:class:`ShiftAndLogScale`), so that ``K``
flows cost about what one costs (a flow step here is a few hundred small tensor
operations, whose count, not their size, sets the time). Adam's update is elementwise,
so the restarts, which share no parameter, are fitted independently.
"""

from __future__ import annotations

import copy
import math

import torch
from pyro.distributions.transforms import AffineCoupling

from ppl_notes.vi.gaussian_family import Gaussian

__all__ = ["FLOW_GUIDE", "Flows", "FlowRestart", "ShiftAndLogScale", "SinhArcsinh",
           "flows_from_gaussians", "FLOW_LAYERS", "hidden_width"]

#: The name a flow fit's guide goes by (``info["guide"]``, the result file's ``guide``)
FLOW_GUIDE = "RealNVP"
#: Coupling layers: every coordinate is moved three times, by functions of the others
FLOW_LAYERS = 6
#: The log-scales of a coupling are clipped to this range (Pyro's defaults)
_LOG_SCALE_CLIP = (-5.0, 3.0)
#: The log tail weight of :class:`SinhArcsinh`: tails up to about x^3 of a Gaussian's
_LOG_TAIL_CLIP = (-1.1, 1.1)


def hidden_width(dim: int) -> int:
    """The couplings' hidden width: twice the dimension, at least 16 and at most 128."""
    return int(min(max(2 * dim, 16), 128))


class ShiftAndLogScale(torch.nn.Module):
    """A coupling's networks, one per restart: two tanh hidden layers, then shift and log-scale.

    What Pyro's :class:`~pyro.nn.DenseNN` computes for ``param_dims=[n, n]``, for
    ``restarts`` independent networks at once: inputs ``(K, M, inputs)``, weights
    ``(K, inputs, width)``, batched products. The last layer starts at zero: shift 0,
    log-scale 0, the identity.
    """

    def __init__(self, restarts: int, inputs: int, width: int, outputs: int,
                 generator: torch.Generator):
        super().__init__()

        def uniform(fan_in: int, *shape: int) -> torch.nn.Parameter:
            # torch.nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(fan_in)
            values = torch.rand(*shape, generator=generator, dtype=torch.float64)
            return torch.nn.Parameter((2 * values - 1) * bound)

        self.w1, self.b1 = uniform(inputs, restarts, inputs, width), uniform(
            inputs, restarts, 1, width)
        self.w2, self.b2 = uniform(width, restarts, width, width), uniform(
            width, restarts, 1, width)
        self.w3 = torch.nn.Parameter(torch.zeros(restarts, width, 2 * outputs,
                                                 dtype=torch.float64))
        self.b3 = torch.nn.Parameter(torch.zeros(restarts, 1, 2 * outputs,
                                                 dtype=torch.float64))
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, log-scale)`` of the coupled half, from the half that passes through."""
        hidden = torch.tanh(torch.baddbmm(self.b1, x, self.w1))
        hidden = torch.tanh(torch.baddbmm(self.b2, hidden, self.w2))
        return torch.baddbmm(self.b3, hidden, self.w3).split(self.outputs, dim=-1)


class SinhArcsinh(torch.nn.Module):
    r"""An elementwise location, scale, skew and tail layer, one per restart and coordinate.

    .. math:: y = m + e^{\sigma}\sinh\big(\tau\,(\operatorname{asinh} x + s)\big),
              \qquad \log\frac{dy}{dx} = \sigma + \log\tau
              + \log\cosh\big(\tau(\operatorname{asinh}x + s)\big) - \tfrac12\log(1 + x^2)

    (Jones & Pewsey 2009; TensorFlow Probability's ``SinhArcsinh`` distribution, with its
    location and scale). At :math:`m = \sigma = s = 0, \tau = 1` it is the identity;
    :math:`\tau > 1` makes the tails heavier (:math:`y \approx (2x)^\tau/2` far out),
    which no affine coupling does: its log-scales are bounded functions, so a Gaussian
    base keeps Gaussian tails (Jaini et al. 2020, "Tails of Lipschitz triangular
    flows"). Eight schools' :math:`\log\tau` (skew -1.4) and GARCH's parameters (excess
    kurtosis 2.1) need both. The location and scale move the whole flow off its
    Gaussian in one step each: the Gaussian fit seeks a mode and is too narrow where the
    posterior is not Gaussian (a banana's: sd 0.49 of 1 along one axis), and the
    couplings widen it only through their networks. Pyro has no such transform; it
    inverts in closed form, :math:`x = \sinh(\operatorname{asinh}((y - m)e^{-\sigma})/\tau
    - s)`.
    """

    def __init__(self, restarts: int, dim: int):
        super().__init__()

        def zeros() -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.zeros(restarts, 1, dim, dtype=torch.float64))

        self.loc, self.log_scale, self.skew, self.log_tail = zeros(), zeros(), zeros(), zeros()

    def _tail(self) -> torch.Tensor:
        return self.log_tail.clamp(*_LOG_TAIL_CLIP).exp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|dy/dx|)`` summed over the last dim."""
        tail = self._tail()
        inner = tail * (torch.asinh(x) + self.skew)
        log_det = self.log_scale + tail.log() + _log_cosh(inner) - 0.5 * torch.log1p(x * x)
        return self.loc + self.log_scale.exp() * torch.sinh(inner), log_det.sum(-1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log|dy/dx| at x)``: the inverse, and the forward log-determinant there."""
        tail = self._tail()
        inner = torch.asinh((y - self.loc) * (-self.log_scale).exp())
        x = torch.sinh(inner / tail - self.skew)
        log_det = self.log_scale + tail.log() + _log_cosh(inner) - 0.5 * torch.log1p(x * x)
        return x, log_det.sum(-1)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\cosh x`, without overflow: :math:`|x| + \log(1 + e^{-2|x|}) - \log 2`."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2)


class Flows:
    r"""``K`` Real-NVP flows, one per restart, on their Gaussians' whitened coordinates.

    Parameters
    ----------
    mean : torch.Tensor
        The Gaussians' means :math:`\mu`, ``(K, d)``, float64.
    tril : torch.Tensor
        Their Cholesky factors :math:`L`, ``(K, d, d)``.
    couplings : torch.nn.ModuleList
        The :class:`AffineCoupling` layers, each over all restarts, then one
        :class:`SinhArcsinh` layer.
    permutations : list of torch.Tensor
        The permutation applied before each coupling.

    Attributes
    ----------
    flat : torch.Tensor
        Every layer parameter's values in one vector: the parameters are views of it.
    """

    family = "flow"

    def __init__(self, mean: torch.Tensor, tril: torch.Tensor,
                 couplings: torch.nn.ModuleList, permutations: list[torch.Tensor]):
        self.mean, self.tril = mean, tril
        self.layers, self.permutations = couplings, permutations
        self.inverse_permutations = [torch.argsort(p) for p in permutations]
        self._log_det_tril = tril.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)  # (K,)
        # every parameter a view of one flat vector, which Adam updates in place
        self.flat = torch.cat([p.detach().reshape(-1) for p in couplings.parameters()])
        offset, self._parameters = 0, list(couplings.parameters())
        for parameter in self._parameters:
            parameter.data = self.flat[offset:offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        # the same layers with their parameters' storage but no gradient: the
        # sticking-the-landing estimator's log q sees z, not the parameters
        self._frozen = _copied(couplings)
        for frozen, live in zip(self._frozen.parameters(), couplings.parameters(),
                                strict=True):
            frozen.requires_grad_(False)
            frozen.data = live.data

    @property
    def restarts(self) -> int:
        """The number of flows."""
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        """The number of unconstrained elements."""
        return self.mean.shape[-1]

    def parameters(self) -> list[torch.Tensor]:
        """The couplings' parameters (the base Gaussians stay fixed), views of :attr:`flat`."""
        return self._parameters

    def flat_grad(self) -> torch.Tensor:
        """The parameters' gradients as one vector, in :attr:`flat`'s order (zeros where none)."""
        return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None
                          else p.grad.reshape(-1) for p in self.parameters()])

    def _forward(self, epsilon: torch.Tensor, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T(epsilon), log|det J_T(epsilon)|)`` for ``epsilon`` ``(K, M, d)``."""
        x = epsilon
        log_det = torch.zeros(epsilon.shape[:-1], dtype=epsilon.dtype)
        *couplings, tails = layers
        for coupling, permutation in zip(couplings, self.permutations, strict=True):
            x = coupling._call(x[..., permutation])
            log_det = log_det + _log_scale_sum(coupling)
        x, tail_log_det = tails(x)
        return x, log_det + tail_log_det

    def _inverse(self, whitened: torch.Tensor, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T^{-1}(w), log|det J_T(T^{-1}(w))|)``."""
        *couplings, tails = layers
        y, log_det = tails.inverse(whitened)
        for coupling, inverse in zip(reversed(couplings), reversed(self.inverse_permutations),
                                     strict=True):
            x = coupling._inverse(y)
            log_det = log_det + _log_scale_sum(coupling)
            y = x[..., inverse]
        return y, log_det

    def _log_prob_whitened(self, whitened: torch.Tensor, layers) -> torch.Tensor:
        epsilon, log_det = self._inverse(whitened, layers)
        return (-0.5 * epsilon.pow(2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
                - log_det - self._log_det_tril[:, None])

    def _points(self, whitened: torch.Tensor) -> torch.Tensor:
        return self.mean[:, None, :] + whitened @ self.tril.transpose(-1, -2)

    def draw(self, epsilon: torch.Tensor) -> torch.Tensor:
        r"""Points :math:`z = \mu + L\,T(\varepsilon)`, ``epsilon`` ``(K, M, d)``."""
        with torch.no_grad():
            return self._points(self._forward(epsilon, self.layers)[0])

    def log_prob(self, points: torch.Tensor) -> torch.Tensor:
        """Each flow's log density at its ``points`` ``(K, M, d)``: ``(K, M)``."""
        with torch.no_grad():
            centred = (points - self.mean[:, None, :]).transpose(-1, -2)
            whitened = torch.linalg.solve_triangular(self.tril, centred, upper=False)
            return self._log_prob_whitened(whitened.transpose(-1, -2), self.layers)

    def draw_for_training(self, epsilon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(z, log q(z))`` with gradients: z through the live layers, log q through z only.

        The sticking-the-landing estimator (Roeder, Wu & Duvenaud 2017): the score term
        :math:`\nabla_\phi \log q_\phi(z)` at fixed z, whose expectation is zero, is left
        out, so the gradient's variance vanishes as q reaches the posterior.
        """
        whitened, _ = self._forward(epsilon, self.layers)
        return self._points(whitened), self._log_prob_whitened(whitened, self._frozen)

    def restart(self, k: int) -> FlowRestart:
        """Restart ``k``'s flow, as the draws' evaluation takes a q."""
        return FlowRestart(self, k)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the parameters (restore one restart's with :meth:`restore`)."""
        return [p.detach().clone() for p in self.parameters()]

    def restore(self, k: int, snapshot: list[torch.Tensor]) -> None:
        """Set restart ``k``'s parameters to those of ``snapshot``."""
        with torch.no_grad():
            for parameter, saved in zip(self.parameters(), snapshot, strict=True):
                parameter[k] = saved[k]

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Restart ``k``'s parameters by name, detached copies (its Gaussian's too)."""
        state = {"flow.mean": self.mean[k].clone(), "flow.tril": self.tril[k].clone()}
        for name, value in self.layers.state_dict().items():
            state[f"flow.layer.{name}"] = value[k].detach().clone()
        for layer, permutation in enumerate(self.permutations):
            state[f"flow.permutation.{layer}"] = permutation.clone()
        return state


class FlowRestart:
    """One restart's flow of a :class:`Flows`: ``dim``, ``draw`` and ``log_prob`` of ``(M, d)``."""

    family = "flow"

    def __init__(self, flows: Flows, k: int):
        self.flows, self.k = flows, k

    @property
    def dim(self) -> int:
        """The number of unconstrained elements."""
        return self.flows.dim

    def _batch(self, rows: torch.Tensor) -> torch.Tensor:
        batch = torch.zeros((self.flows.restarts,) + tuple(rows.shape), dtype=rows.dtype)
        batch[self.k] = rows
        return batch

    def draw(self, epsilon: torch.Tensor) -> torch.Tensor:
        """Points of this flow for standard-normal ``epsilon`` ``(M, d)``."""
        return self.flows.draw(self._batch(epsilon))[self.k]

    def log_prob(self, points: torch.Tensor) -> torch.Tensor:
        """The log density of this restart's flow at ``points`` ``(M, d)``."""
        return self.flows.log_prob(self._batch(points))[self.k]


def _log_scale_sum(coupling: AffineCoupling) -> torch.Tensor:
    """The log-determinant of the coupling's last ``_call`` or ``_inverse``, and no more.

    Both set ``_cached_log_scale``, the clipped log-scales they applied, whose sum is
    the log-determinant; reading it saves a second run of the network
    (``log_abs_det_jacobian`` reruns it unless the transform was called through its
    cache). It is cleared after, so that no graph outlives its step.
    """
    log_scale, coupling._cached_log_scale = coupling._cached_log_scale, None
    return log_scale.sum(-1)


def _copied(couplings: torch.nn.ModuleList) -> torch.nn.ModuleList:
    """A deep copy of the layers, their caches emptied first (a cached graph cannot be copied)."""
    for coupling in couplings:
        if isinstance(coupling, AffineCoupling):
            coupling._cached_log_scale = None
            coupling._cached_x_y = None, None
    return copy.deepcopy(couplings)


def flows_from_gaussians(qs: list[Gaussian], seed: int, layers: int = FLOW_LAYERS) -> Flows:
    """One flow per Gaussian in ``qs``, each its Gaussian at the start (identity layers).

    The permutations alternate between reversing the coordinates and a random
    permutation (seeded by ``seed``, shared by the restarts), so that in two dimensions
    each coordinate is moved by the other in turn, and in more each is moved by changing
    sets of the others. With one element there is nothing to couple: the flow is its
    :class:`SinhArcsinh` layer (location, scale, skew and tails).
    """
    dim = qs[0].dim
    generator = torch.Generator().manual_seed(seed)
    split, width = dim // 2, hidden_width(dim)
    couplings, permutations = torch.nn.ModuleList(), []
    for k in range(layers if dim > 1 else 0):  # one element: the sinh-arcsinh layer alone
        if k % 2:
            permutations.append(torch.arange(dim - 1, -1, -1))
        elif k:
            permutations.append(torch.randperm(dim, generator=generator))
        else:
            permutations.append(torch.arange(dim))
        network = ShiftAndLogScale(len(qs), split, width, dim - split, generator)
        couplings.append(AffineCoupling(split, network, log_scale_min_clip=_LOG_SCALE_CLIP[0],
                                        log_scale_max_clip=_LOG_SCALE_CLIP[1]))
    couplings.append(SinhArcsinh(len(qs), dim))
    mean = torch.stack([q.mean.detach().to(torch.float64) for q in qs])
    tril = torch.stack([q.cholesky().detach().to(torch.float64) for q in qs])
    return Flows(mean, tril, couplings, permutations)
