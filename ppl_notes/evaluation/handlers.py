"""Pyro handlers the evaluation layer runs stories under.

* :class:`Unconstrain` substitutes latent values given on the unconstrained space and
  maps each through ``biject_to`` of the support the site has *at that moment*, as
  NumPyro's potential does: a bound that depends on another parameter (GARCH's
  ``beta1 < 1 - alpha1``) is honoured at every evaluation, not frozen at the start.
* :class:`VmapSafeEnum` is Pyro's enumeration without its one read of ``Tensor.data``,
  which ``torch.func.vmap`` forbids.
* :func:`vmap_safe_contraction` swaps Pyro's ``safe_log`` (an ``autograd.Function``
  without the ``setup_context`` that functorch transforms need) for ``torch.log`` inside
  the log-space einsum that sums enumerated sites out; the operands there are shifted by
  their maximum, so the argument of the log is positive wherever the result is finite.
  It also has ``infer_discrete`` enumerate with :class:`VmapSafeEnum`, builds
  ``OrderedLogistic``'s category probabilities out of place, and bounds that
  einsum's guard against ``-inf - -inf`` at -1e30 instead of ``finfo(dtype).min``: under
  vmap the guard of a float32 operand is traced as float64's minimum, which inductor
  cannot write as a float32 constant (the compile failed and the story ran uncompiled).
* :class:`Unvalidated` turns off the argument and sample checks of a distribution the
  story built *before* the run (a ``PyroSample`` prior of a ``PyroModule``, made while
  validation was on): ``pyro.validation_enabled(False)`` reaches only distributions made
  under it, and a check reads values (``.all()``), which no compiled potential can hold.
* :func:`run_dtype` runs a story under the run's dtype, so the constants a user writes
  with torch's default dtype (``torch.ones(3)``, ``dist.Beta(5., 5.)``) agree with data.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Mapping

import pyro.infer.discrete as infer_discrete_module
import pyro.ops.einsum.torch_log as torch_log_einsum
import torch
from pyro.distributions import Categorical, OrderedLogistic
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.transforms import biject_to
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger

from ppl_notes._dtype import run_dtype

__all__ = ["Unconstrain", "Unvalidated", "VmapSafeEnum", "vmap_safe_contraction",
           "run_dtype"]


def _unvalidated(fn, depth: int = 4):
    """``fn`` without its validation: a shallow copy, its base distributions too."""
    if depth == 0 or not isinstance(fn, torch.distributions.Distribution):
        return fn
    base = getattr(fn, "base_dist", None)
    if not getattr(fn, "_validate_args", False) and base is None:
        return fn
    fn = copy.copy(fn)
    fn._validate_args = False
    if base is not None:
        fn.base_dist = _unvalidated(base, depth - 1)
    return fn


class Unvalidated(Messenger):
    """Sample sites' distributions with their checks off (see the module docstring)."""

    def _pyro_sample(self, msg) -> None:
        msg["fn"] = _unvalidated(msg["fn"])


class Unconstrain(Messenger):
    r"""Substitute latent sites from unconstrained values, recording the log-Jacobian.

    For each named site :math:`\theta = T(u)` with :math:`T` = ``biject_to(support)``
    of the site's distribution as the story builds it; ``log_det[name]`` holds
    :math:`\log|\det J_T(u)|` with the site's batch shape, ``constrained[name]`` the
    value.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values
        self.log_det: dict[str, torch.Tensor] = {}
        self.constrained: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if name not in self.values or msg["is_observed"]:
            return
        unconstrained = self.values[name]
        transform = biject_to(msg["fn"].support)
        value = transform(unconstrained)
        self.log_det[name] = transform.log_abs_det_jacobian(unconstrained, value)
        self.constrained[name] = value
        msg["value"] = value
        msg["is_observed"] = True


class VmapSafeEnum(EnumMessenger):
    """Pyro's :class:`~pyro.poutine.enum_messenger.EnumMessenger`, usable under vmap."""

    def _pyro_post_sample(self, msg) -> None:
        # Pyro's version reads ``value.data.shape``; under vmap only ``value.shape`` exists.
        if not isinstance(msg["fn"], TorchDistributionMixin) or msg["value"] is None:
            return
        value = msg["value"]
        shape = value.shape[: value.dim() - msg["fn"].event_dim]
        dim_to_id = msg["infer"].setdefault("_dim_to_id", {})
        dim_to_id.update(self._param_dims.get(msg["name"], {}))
        self._value_dims[msg["name"]] = {
            dim: id_ for dim, id_ in dim_to_id.items() if len(shape) >= -dim and shape[dim] > 1
        }


_contraction_lock = threading.RLock()


@contextlib.contextmanager
def vmap_safe_contraction():
    """Make Pyro's contraction and ``infer_discrete`` usable under vmap (see module)."""
    with _contraction_lock:
        original_log, original_enum = torch_log_einsum.safe_log, infer_discrete_module.EnumMessenger
        original_torch = torch_log_einsum.torch
        torch_log_einsum.safe_log = torch.log
        torch_log_einsum.torch = _TorchWithFiniteGuard()
        infer_discrete_module.EnumMessenger = VmapSafeEnum
        original_ordered = OrderedLogistic.__init__
        OrderedLogistic.__init__ = _ordered_logistic_init
        try:
            yield
        finally:
            torch_log_einsum.safe_log = original_log
            torch_log_einsum.torch = original_torch
            infer_discrete_module.EnumMessenger = original_enum
            OrderedLogistic.__init__ = original_ordered


def _ordered_logistic_init(self, predictor, cutpoints, validate_args=None):
    """Pyro's ``OrderedLogistic``, its category probabilities joined out of place.

    Pyro's writes them into a tensor of zeros in place, which vmap refuses when the
    predictor is vmapped and the zeros are not; the probabilities are the same numbers.
    """
    q = torch.sigmoid(cutpoints - predictor.unsqueeze(-1))
    self.predictor = predictor.expand(q.shape[:-1])
    self.cutpoints = cutpoints.expand(q.shape)
    p = torch.cat([q[..., :1], q[..., 1:] - q[..., :-1], 1 - q[..., -1:]], dim=-1)
    Categorical.__init__(self, p, validate_args=validate_args)


class _FiniteGuard:
    min = -1e30  # below any log density a story reaches; finite in float32 and float64


class _TorchWithFiniteGuard:
    """``torch`` as Pyro's log-space einsum sees it, with ``finfo(...).min`` = -1e30."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def finfo(dtype=None):
        return _FiniteGuard
