"""Helpers that read Pyro traces: site kinds, names of distributions and supports."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from ppl_notes._dtype import run_dtype
from ppl_notes.errors import DataError

logger = logging.getLogger(__name__)

_POSITIVE_NAMES = {"GreaterThan(lower_bound=0.0)", "GreaterThanEq(lower_bound=0.0)"}


def trace_model(model, data: Mapping[str, Any], seed: int = 0, replay=None):
    """Trace one run of ``model`` on ``data`` (optionally replayed against a guide trace).

    A story (or a guide of one) runs in its story's dtype. A latent site whose
    distribution cannot be sampled (``ImproperUniform``, a flat prior as in Stan) takes a
    value drawn uniformly on (-2, 2) in its unconstrained space, as Pyro's
    ``init_to_uniform`` does. Where a linear-algebra step fails at the prior draw, other
    draws are tried (up to 20); any other error is raised at once.
    """
    fn = poutine.replay(model, trace=replay) if replay is not None else model
    fn = InitMessenger(sample_or_dispersed)(fn)
    dtype = getattr(model, "dtype", None) or getattr(getattr(model, "model", None), "dtype",
                                                     None)
    attempts = 1 if replay is not None else _ATTEMPTS
    for attempt in range(attempts):
        try:
            with (pyro.poutine.seed(rng_seed=seed + 1000 * attempt),
                  run_dtype(dtype or torch.get_default_dtype())):
                return poutine.trace(fn).get_trace(**data)
        except torch.linalg.LinAlgError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


#: Prior draws tried where a linear-algebra step of the story fails (a Cholesky factor at
#: an extreme length scale): the sampler rejects such points, so the story is still usable.
_ATTEMPTS = 20


def unconstrained_value(site, unconstrained: torch.Tensor | float = 0.0) -> torch.Tensor:
    """A value in a site's support, mapped from ``unconstrained`` (the origin by default).

    Needs no sampling, so it works for ``ImproperUniform`` sites too (Pyro's
    ``init_to_feasible`` draws a sample to learn the shape).
    """
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
    return transform(torch.zeros(shape) + unconstrained)


def dispersed_value(site, radius: float = 2.0) -> torch.Tensor:
    """A start drawn uniformly in (-radius, radius) of the unconstrained space.

    Mapped into the site's support (Stan's default inits); needs no sampling, as
    :func:`unconstrained_value`.
    """
    fn = site["fn"]
    shape = biject_to(fn.support).inverse_shape(fn.batch_shape + fn.event_shape)
    return unconstrained_value(site, torch.rand(shape) * 2 * radius - radius)


def sample_or_dispersed(site, radius: float = 2.0):
    """A prior draw, or :func:`dispersed_value` where the prior cannot be sampled.

    ``ImproperUniform`` (Stan's flat priors) cannot.
    """
    try:
        return init_to_sample(site)
    except NotImplementedError:
        return dispersed_value(site, radius)


def is_deterministic(site) -> bool:
    """A ``pyro.deterministic`` site, or one of its kind: a fully masked ``Delta`` at its value.

    ``poutine.reparam`` leaves the reparameterised site so (``LocScaleReparam`` makes
    ``theta`` the masked ``Delta`` of ``mu + tau * theta_decentered``): a function of the
    latent sites that adds nothing to the density, which users ask for by name.
    """
    if site["infer"].get("_deterministic"):
        return True
    fn = site["fn"]
    return bool(site["is_observed"] and isinstance(fn, dist.MaskedDistribution)
                and fn._mask is False and isinstance(fn.base_dist, dist.Delta))


def sample_sites(trace) -> dict[str, dict]:
    """The sample sites of a trace, in order, without plates' and deterministic sites."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
        and not is_deterministic(site)
    }


def deterministic_sites(trace) -> dict[str, dict]:
    """The deterministic sites of a trace: functions of its latent sites (is_deterministic)."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and is_deterministic(site)
    }


def latent_sites(trace) -> dict[str, dict]:
    """The non-observed, non-auxiliary sample sites of a trace, in order."""
    return {
        name: site
        for name, site in sample_sites(trace).items()
        if not site["is_observed"]
        and not site["infer"].get("is_auxiliary")
    }


def is_enumerable(fn) -> bool:
    """Whether a distribution is discrete with a finite support Pyro can enumerate."""
    return bool(fn.support.is_discrete and getattr(fn, "has_enumerate_support", False))


def distribution_name(fn) -> str:
    """The name of a site's distribution, looking through Independent/Expanded wrappers."""
    while hasattr(fn, "base_dist") and type(fn).__name__ in {
        "Independent",
        "ExpandedDistribution",
        "MaskedDistribution",
    }:
        fn = fn.base_dist
    return type(fn).__name__


def strip_independent(constraint):
    """The element-wise constraint inside ``independent(...)`` wrappers."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint


def support_name(constraint) -> str:
    """A readable name for a support constraint (``positive``, ``real``, ``simplex``...)."""
    base = strip_independent(constraint)
    text = str(base)
    if text in _POSITIVE_NAMES:
        return "positive"
    if text == "Real()":
        return "real"
    return text.replace("()", "").lower() if text.endswith("()") else text


def supports_compatible(model_support, guide_fn, num_draws: int = 256) -> bool:
    """Whether a guide distribution's (or a constraint's) support lies in the model's.

    Equal supports pass by name, up to boundaries (nonnegative and positive). A
    ``TransformedDistribution`` of an unbounded base (the Stan way:
    ``TransformedDistribution(Normal(...), biject_to(support))``) reports only its last
    transform's codomain -- ``real`` for an affine map -- so its support is read from where
    its draws fall: every one of ``num_draws`` must lie in the model's.
    """
    guide_support = getattr(guide_fn, "support", guide_fn)
    if support_name(model_support) == support_name(guide_support):
        return True
    if not hasattr(guide_fn, "support"):
        return False
    base = guide_fn
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        base = base.base_dist
    if not isinstance(base, torch.distributions.TransformedDistribution):
        return False
    if support_name(base.base_dist.support) != "real":
        return False
    with torch.no_grad():
        draws = guide_fn.sample((num_draws,))
    return bool(model_support.check(draws).all())


def trace_plate_nesting(trace) -> int:
    """The deepest plate nesting of any sample site of a trace."""
    depth = 0
    for site in sample_sites(trace).values():
        dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
        depth = max([depth, *dims])
    return depth


def guess_max_plate_nesting(model, data: Mapping[str, Any]) -> int:
    """The deepest plate nesting of any site in one run of the model."""
    return trace_plate_nesting(trace_model(model, data, 0))


def trace_with_index_covariates(model, data: dict[str, Any]):
    """One run of the story on ``data``; integer covariates used as indices become long.

    Data arrive as floating-point tensors; a story that indexes with a covariate
    (``locs[group]``, as Pyro users write) needs it as integers. On torch's "used as
    indices" error the integer-valued covariates are made ``torch.long`` and the run
    is tried again.
    """
    with torch.no_grad(), run_dtype(model.dtype):
        try:
            return trace_model(model, data, 0)
        except IndexError as error:
            observed = set(model.observed_arguments.values())
            integer = {k: v.long() for k, v in data.items()
                       if k not in observed and torch.is_tensor(v) and v.is_floating_point()
                       and bool((v == v.round()).all())}
            if "used as indices" not in str(error) or not integer:
                raise
            negative = {k: int((v < 0).sum()) for k, v in integer.items() if bool((v < 0).any())}
            if negative:  # torch takes -1 as the last group: a missing group read as one
                key, count = next(iter(negative.items()))
                raise DataError(
                    f"story {model.name!r}: data for {key!r} index a tensor "
                    f"(used as indices) and hold {count} negative value(s): -1 would "
                    "silently pick the last group (pandas' factorize gives -1 to a missing "
                    "value). Drop or impute those rows, or give them a group of their own"
                ) from error
            trace = trace_model(model, {**data, **integer}, 0)
    logger.info("story %r: integer covariates %s used as indices, now torch.long",
                model.name, sorted(integer))
    data.update(integer)
    return trace
