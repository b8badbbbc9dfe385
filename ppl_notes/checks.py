"""Checks that run before any inference: data against a story, a guide against a story.

:func:`check_data` runs the story once on the prepared data and names whatever does not
fit, as a ``DataError`` (the data's fault) or a ``StoryError`` (the story's), before a
method starts; :func:`check_pairing` holds a guide to its story's latent sites. Both name
the site, argument or line at fault.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

from ppl_notes._dtype import run_dtype
from ppl_notes._sites import (
    distribution_name,
    is_enumerable,
    latent_sites,
    sample_sites,
    strip_independent,
    support_name,
    supports_compatible,
    trace_model,
    trace_with_index_covariates,
)
from ppl_notes.errors import DataError, ModelGuideMismatchError, StoryError

if TYPE_CHECKING:
    from ppl_notes.story import Model

__all__ = ["check_data", "check_data_runs", "check_pairing", "observed_data_arguments",
           "blame_invalid_parameter", "invalid_parameter", "probe_seeds", "PROBE_DRAWS"]

logger = logging.getLogger(__name__)

#: Prior draws at which :func:`check_data` runs the story besides its first run
PROBE_DRAWS = 7

_INVALID_PARAMETER = re.compile(
    r"Expected parameter (\w+) .*? of distribution (\w+)\(.*?\) to satisfy the constraint "
    r"(.+?), but found invalid values", re.DOTALL)

#: torch's words for two floating dtypes meeting in one operation
_MIXED_DTYPES = re.compile(r"(same dtype|dtype.*(Double|Float).*(Double|Float)|expected scalar "
                           r"type (Double|Float) but found (Double|Float)|double != float|"
                           r"float != double)", re.IGNORECASE)


def check_data(model, data: dict[str, Any]):
    """Run the story once on prepared data and name whatever does not fit.

    :func:`check_data_runs`, returning its first run only.
    """
    return check_data_runs(model, data)[0]


def check_data_runs(model, data: dict[str, Any], seed: int = 0):
    """Run the story once on prepared data and name whatever does not fit.

    Integer-valued covariates that the story uses as indices (``locs[group]``) become
    ``torch.long`` in ``data``; an observed site whose data argument was not named is
    matched to it here.

    ``seed`` (``infer()``'s) seeds the :data:`PROBE_DRAWS` prior draws after the first run
    (:func:`probe_seeds`): SVI's restarts start at them (they were runs of their own).

    Raises
    ------
    DataError
        When the story cannot run on the data (a shape that does not fit its
        plates), or an observed site's data has another shape than its distribution.
    StoryError
        When the story has no sample sites, or never observes a declared site.

    Returns
    -------
    (pyro.poutine.Trace, list of pyro.poutine.Trace)
        The run, from which the story's facts are read, and the runs at
        :data:`PROBE_DRAWS` more prior draws that did not raise (the path choice's
        prior points are taken from them: :func:`~ppl_notes.evaluation.paths.keep_check_points`).
    """
    try:
        trace = trace_with_index_covariates(model, data)
    except (ValueError, RuntimeError, IndexError) as error:
        blame_invalid_parameter(model, error, data)
        _blame_mixed_dtypes(model, error)
        shapes = {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise DataError(f"story {model.name!r} cannot run on this data: {reason}. The "
                        f"data's shapes: {shapes}") from error
    probes = _probe_prior_draws(model, data, seed)
    sites = sample_sites(trace)
    if not sites:
        raise StoryError(f"story {model.name!r} has no pyro.sample sites: a story draws "
                         "its latent values and observations with pyro.sample")
    slashed = [name for name, site in trace.nodes.items()
               if site["type"] == "sample" and "/" in name]
    if slashed:  # netCDF (and so ArviZ's files) reads '/' as a group's path
        raise StoryError(f"story {model.name!r}: site name(s) {slashed} hold '/', which a "
                         "result file reads as a group's path; name them with '.' or '_' "
                         "(pyro.sample('layer1.loc', ...))")
    arguments = {**model.observed_arguments, **observed_data_arguments(model, data, trace)}
    for name in model.observed:
        site = sites.get(name)
        if site is None or not site["is_observed"]:
            argument = model.observed_arguments.get(name) or "..."
            raise StoryError(
                f"story {model.name!r} declares {name!r} observed but never calls "
                f"pyro.sample({name!r}, ..., obs={argument})")
        expected = tuple(site["fn"].batch_shape + site["fn"].event_shape)
        got = tuple(site["value"].shape)
        if got != expected:
            plates = [f.name for f in site["cond_indep_stack"]]
            raise DataError(
                f"story {model.name!r}: data for observed site {name!r} has shape {got}, "
                f"but its distribution inside plates {plates} gives shape {expected}")
        _check_support(model, name, site, arguments.get(name))
    return trace, probes


def require_fixed_latent_sites(model, runs: list) -> None:
    """Every run at a prior draw samples the same latent sites, else a StoryError.

    A latent site under a branch on a value (``if mu > 2: pyro.sample("shift", ...)``)
    makes the parameters come and go with the point: no one density on a fixed space,
    which NUTS, MAP and the VI families on the potential need (Pyro's own SVI with a
    guide function that follows the branch can fit such a story). ``runs`` are the data
    checks' (:func:`check_data_runs`); the evaluation catches a change any later point
    shows.
    """
    names = [tuple(latent_sites(run)) for run in runs]
    every, some = set.intersection(*map(set, names)), set.union(*map(set, names))
    if every != some:
        raise changing_sites_error(f"story {model.name!r}", f"{sorted(some - every)} are "
                                   "sampled at some prior draws and not at others")


def changing_sites_error(story: str, which: str) -> StoryError:
    """The error for a story whose latent sites come and go with its parameters' values.

    ``which`` says which sites and where (:func:`require_fixed_latent_sites`, and the
    evaluation at any later point, :mod:`ppl_notes.evaluation.density`).
    """
    return StoryError(
        f"{story}: its latent sites change with the values of its parameters: {which} (a "
        "site under a branch on a value, such as `if mu > 0: pyro.sample(...)`). A "
        "posterior over parameters that come and go is not one density on a fixed space, "
        "which NUTS and VI need: sample every latent site on every run, and let the branch "
        "choose how it is used (torch.where, or a factor)")


def observed_data_arguments(model, data: Mapping[str, Any], trace) -> dict[str, str]:
    """The data argument of each observed site declared by its name alone, found in a run.

    For ``pyro.sample("obs", ..., obs=y)`` declared ``observed="obs"``: the argument of
    ``data`` whose value is the site's value (the same tensor) in ``trace``, a run of
    the story on ``data`` (:func:`check_data`'s).
    """
    sites = sample_sites(trace)
    found = {}
    for name, argument in model.observed_arguments.items():
        site = sites.get(name)
        if argument is None and site is not None and site["is_observed"]:
            match = next((k for k, v in data.items() if v is site["value"]), None)
            if match is not None:
                found[name] = match
    return found


def probe_seeds(seed: int) -> list[int]:
    """The seeds of the data checks' prior draws for ``infer(seed=seed)``: 1-7 for seed 0.

    Distinct for distinct seeds below 2**31 / 8, and small enough for the retries'
    offsets (:func:`~ppl_notes._sites.trace_model`) to stay below NumPy's 2**32.
    """
    return [(seed * (PROBE_DRAWS + 1) + i) % 2**31 for i in range(1, PROBE_DRAWS + 1)]


def _probe_prior_draws(model, data: Mapping[str, Any], seed: int = 0) -> list:
    """Run the story at a few more prior draws, to name an invalid parameter.

    Some prior draws can give a distribution an invalid parameter (a Normal prior on a
    scale: half its draws are negative), and one run can miss it (seed 0 drew a
    positive scale); with :data:`PROBE_DRAWS` more, a parameter invalid on half the
    prior is missed once in 256 stories. Errors that are not an invalid parameter
    are left to the methods, which reject such points. Returns the runs that did not
    raise.
    """
    runs = []
    with torch.no_grad(), run_dtype(model.dtype):
        for probe in probe_seeds(seed):
            try:
                runs.append(trace_model(model, data, probe))
            except (ValueError, RuntimeError) as error:
                blame_invalid_parameter(model, error, data)
    return runs

def _blame_mixed_dtypes(model, error: Exception) -> None:
    """A story that mixes float32 and float64 tensors: a StoryError naming both.

    The data are converted to the story's dtype, so the other dtype comes from a
    tensor the story made or carries (:mod:`ppl_notes._constants`): the line of the
    story where they met is named, with the fix.
    """
    message = str(error)
    if not _MIXED_DTYPES.search(message):
        return
    code = getattr(model.fn.forward if isinstance(model.fn, torch.nn.Module) else model.fn,
                   "__code__", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if code is not None and f.filename == code.co_filename]
    where = (f" at line {frames[-1].lineno} (`{frames[-1].line}`)"
             if frames and frames[-1].line else "")
    raise StoryError(
        f"story {model.name!r} mixes float32 and float64 tensors{where}: "
        f"{message.strip().splitlines()[0]}. It runs in "
        f"{str(model.dtype).removeprefix('torch.')} ({model.dtype_reason}), and its data "
        "are converted to that; a tensor the story made or closes over keeps the dtype "
        "it was made in. Make the story's constants in one dtype, or pass "
        "@ppl_notes.model(dtype=...)") from error

def blame_invalid_parameter(model, error: Exception, data: Mapping[str, Any]) -> None:
    """Name who gave a distribution an invalid parameter (NaN, a negative scale).

    A DataError when a covariate of the parameter's shape breaks the parameter's
    constraint itself (``sigma`` of zeros), else a StoryError naming the
    distribution, the parameter and the line of the story (a prior or transform that
    leaves the parameter's domain).
    """
    what = invalid_parameter(error, model.fn)
    if what is None:
        return
    parameter, distribution, _ = _INVALID_PARAMETER.search(str(error)).groups()
    shape = re.search(r"Tensor of shape \(([\d, ]*)\)", str(error))
    shape = tuple(int(n) for n in shape.group(1).split(",") if n.strip()) if shape else None
    constraint = getattr(getattr(pyro.distributions, distribution, None), "arg_constraints",
                         {}).get(parameter)
    observed = set(model.observed_arguments.values())
    for name, value in data.items():
        if (name in observed or not torch.is_tensor(value) or shape is None
                or tuple(value.shape) != shape or not isinstance(
                    constraint, constraints.Constraint)):
            continue
        try:
            breaks = not bool(constraint.check(value).all())
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            continue
        if breaks:
            raise DataError(
                f"story {model.name!r}: data {name!r} give {distribution} an invalid "
                f"{parameter} ({what.split(' (', 1)[1]}; check the data") from error
    raise StoryError(
        f"story {model.name!r}: {what}, when run with draws from its priors. A "
        "prior that lets a parameter leave its domain (a Normal prior on a scale), or a "
        "transform that is NaN for some values (log or sqrt of a negative), makes the "
        "log density undefined: give the parameter a prior on its domain (HalfNormal, "
        "LogNormal, Beta) or constrain the transform (or, where data enter the "
        "parameter, check those data)") from error

def _check_support(model, name: str, site: dict, argument: str | None) -> None:
    """Name the first observed element outside its distribution's support.

    Pyro only checks the support when a log density is taken, during inference,
    where the failure reads as a bad step size. Masked elements are checked too, as
    Pyro validates every element before masking. ``argument``, the keyword argument
    holding the site's data, is named where it is not the site's own name.
    """
    fn = site["fn"]
    support = strip_independent(fn.support)  # element by element
    if constraints.is_dependent(support):
        return
    with torch.no_grad():
        try:
            inside = support.check(site["value"])
        except (RuntimeError, ValueError, TypeError):  # a support torch cannot check
            return
        outside = ~inside
        if not bool(outside.any()):
            return
    where = tuple(int(i) for i in outside.nonzero()[0])
    value = site["value"][where] if where else site["value"]
    shown = value.tolist() if value.numel() > 1 else value.item()
    label = f" (argument {argument!r})" if argument and argument != name else ""
    base = getattr(fn, "base_dist", fn)
    raise DataError(
        f"story {model.name!r}: observed site {name!r}{label} has {shown} at element "
        f"{where}, outside the support of {type(base).__name__}: {support} "
        f"({int(outside.sum())} of {outside.numel()} elements are outside). Check the "
        "data, or the distribution the story gives it"
        + ("; masked elements too must lie in the support (fill them with a valid value)"
           if site.get("mask") is not None or hasattr(fn, "_mask") else ""))

def invalid_parameter(error: Exception, fn: Callable) -> str | None:
    """What torch's validation of a distribution's parameter says, with the line of ``fn``.

    "Normal is given an invalid scale (...) at line 9 (`...`)" when ``error`` is that
    validation raised inside ``fn``; None for any other error.
    """
    found = _INVALID_PARAMETER.search(str(error))
    if not isinstance(error, ValueError) or found is None:
        return None
    parameter, distribution, constraint = found.groups()
    code = getattr(getattr(fn, "fn", fn), "__code__", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if code is not None and f.filename == code.co_filename]
    where = (f" at line {frames[-1].lineno} (`{frames[-1].line}`)"
             if frames and frames[-1].line else "")
    if distribution == "Unit":
        return f"pyro.factor is given a log factor that is NaN{where}"
    return (f"{distribution} is given an invalid {parameter} (it must satisfy "
            f"{constraint}){where}")


def check_pairing(model: Model, guide: Callable, data: Mapping[str, Any]) -> None:
    """Check that ``guide`` fits ``model`` before any inference starts.

    Every latent site of the model must be drawn by the guide, unless it is discrete
    with a finite support (it will then be enumerated); every guide site must be a
    latent site of the model; shapes must be equal and the guide's support must lie in
    the model's.

    Raises
    ------
    ModelGuideMismatchError
        Naming the first offending site and what would be valid.
    """
    guide_name = getattr(guide, "name", getattr(guide, "__name__", type(guide).__name__))
    try:
        with pyro.poutine.seed(rng_seed=0):
            guide_trace = poutine.trace(guide).get_trace(**data)
    except ValueError as error:
        what = invalid_parameter(error, guide)
        if what is None:
            raise
        raise ModelGuideMismatchError(
            f"guide {guide_name!r}: {what}, at its initial parameter values; start its "
            "parameters inside their domains (pyro.param(..., constraint=...))") from error
    # The model replayed on the guide's draws: a support that depends on another site
    # (beta1 in (0, 1 - alpha1)) is then the one the guide's draw of that site gives. A
    # guide whose draws the story cannot run on (a wrong shape) is compared with a plain
    # run of the story instead, which names the site below.
    try:
        with torch.no_grad():
            model_trace = trace_model(model, data, 0, replay=guide_trace)
    except (ValueError, RuntimeError, IndexError):
        model_trace = trace_model(model, data, 0)
    model_latent = latent_sites(model_trace)
    guide_sites = {
        name: site
        for name, site in sample_sites(guide_trace).items()
        if not site["is_observed"] and not site["infer"].get("is_auxiliary")
    }
    for name, site in model_latent.items():
        if name in guide_sites:
            continue
        if is_enumerable(site["fn"]):
            continue
        kind = "discrete with infinite support" if site["fn"].support.is_discrete else "continuous"
        raise ModelGuideMismatchError(
            f"guide {guide_name!r} does not draw latent site {name!r} of story "
            f"{model.name!r} ({kind}, {distribution_name(site['fn'])}); add "
            f"pyro.sample({name!r}, ...) to the guide"
        )
    observed = {n for n, s in sample_sites(model_trace).items() if s["is_observed"]}
    for name, site in guide_sites.items():
        if name in observed:
            raise ModelGuideMismatchError(
                f"guide {guide_name!r} samples {name!r}, which is observed in story "
                f"{model.name!r}; a guide draws only latent sites"
            )
        if name not in model_latent:
            raise ModelGuideMismatchError(
                f"guide {guide_name!r} samples {name!r}, which is not a site of story "
                f"{model.name!r}; its latent sites are {sorted(model_latent)}"
            )
        model_fn, guide_fn = model_latent[name]["fn"], site["fn"]
        model_shape = tuple(model_fn.batch_shape + model_fn.event_shape)
        guide_shape = tuple(site["value"].shape)
        if model_shape != guide_shape:
            raise ModelGuideMismatchError(
                f"site {name!r}: guide {guide_name!r} draws shape {guide_shape} but story "
                f"{model.name!r} expects shape {model_shape}"
            )
        if distribution_name(guide_fn) == "Delta":
            # A point mass placed by a transform (AutoContinuous guides such as
            # AutoMultivariateNormal, or AutoDelta): its value must lie in the support.
            if not bool(model_fn.support.check(site["value"]).all()):
                raise ModelGuideMismatchError(
                    f"site {name!r}: guide {guide_name!r} places a point mass outside the "
                    f"support {support_name(model_fn.support)} that story {model.name!r} "
                    f"gives it; transform its value with biject_to(support)"
                )
            continue
        if not supports_compatible(model_fn.support, guide_fn):
            raise ModelGuideMismatchError(
                f"site {name!r}: guide {guide_name!r} draws from {distribution_name(guide_fn)} "
                f"with support {support_name(guide_fn.support)}, but story {model.name!r} "
                f"gives it support {support_name(model_fn.support)}; use a guide family "
                f"on that support (e.g. LogNormal for a positive scale, Dirichlet for a "
                f"simplex, a TransformedDistribution with biject_to(support))"
            )


