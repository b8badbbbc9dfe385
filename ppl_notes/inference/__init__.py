"""``infer()``: one entry point that checks its arguments and dispatches to a back end.

The facade holds no algorithm: :data:`~ppl_notes.inference.backends.BACKENDS` maps each
method name to its :class:`~ppl_notes.inference.backends.Backend` (its options, whether
it takes a guide, the function that runs it). Everything a user can get wrong is
checked here, before any inference starts: the method, each option's name, type and
range, the data against the story, and the guide against the story.
"""

from __future__ import annotations

import json
import numbers
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import torch

from ppl_notes._constants import constants_dtype, module_as_float64
from ppl_notes._dtype import run_dtype
from ppl_notes._progress import show_progress
from ppl_notes._sites import distribution_name
from ppl_notes._threads import fit_threads
from ppl_notes._versions import library_versions
from ppl_notes.arviz_io import to_datatree
from ppl_notes.checks import check_data_runs, require_fixed_latent_sites
from ppl_notes.diagnostics import warn_about
from ppl_notes.errors import InferenceError, OptionError, OptionTypeError, StoryError
from ppl_notes.evaluation import RunContext, story_dtype, story_facts
from ppl_notes.evaluation.log_likelihood_budget import keep_pointwise
from ppl_notes.evaluation.paths import keep_check_points
from ppl_notes.inference._options import validate
from ppl_notes.inference.backends import BACKENDS, methods_with
from ppl_notes.posterior import Posterior
from ppl_notes.story import Guide, Model, check_pairing

__all__ = ["infer", "METHODS"]

#: method name -> the module that runs it (kept for readers of earlier releases; the
#: table is :data:`~ppl_notes.inference.backends.BACKENDS`)
METHODS = {name: backend.module for name, backend in BACKENDS.items()}


def infer(
    model: Model,
    data: Mapping | Any = None,
    *,
    method: str = "svi",
    guide=None,
    seed: int = 0,
    progress: bool = True,
    drop_incomplete: bool = False,
    log_likelihood: bool | None = None,
    **options: Any,
) -> Posterior:
    """Infer the posterior of a story's latent sites given data.

    Parameters
    ----------
    model : Model or callable
        A story made with :func:`ppl_notes.model`, or any Pyro model (a function, a
        ``PyroModule``, a ``functools.partial``): its sites whose ``obs=`` is one of the
        data arguments are observed (:meth:`Model.from_function`; ``info
        ["observed_from_data"]`` says which).
    data : dict, pandas.DataFrame or None
        Observed data and other keyword arguments of the story; ``None`` uses the story's
        default data.
    method : {"svi", "nuts", "map", "mle", "em", "bbvi"}
        The back end. ``svi``: stochastic variational inference (options ``steps``,
        ``learning_rate``, ``num_draws``, ``num_particles``, ``elbo``, ``estimator``...).
        ``nuts``: the No-U-Turn sampler (options ``chains``, ``warmup``, ``draws``,
        ``target_accept``, ``max_tree_depth``, ``engine``, ``init``, ``processes``...).
        ``map`` / ``mle``: the posterior mode / maximum-likelihood point estimate by
        L-BFGS. ``em``: expectation-maximisation for stories with discrete latent sites.
        ``bbvi``: black-box VI with score-function gradients and Robbins-Monro steps.
        ``ppl_notes.inference.backends.BACKENDS`` lists them; each back end's ``options``
        documents its options.
    guide : Guide, callable or {"meanfield", "fullrank"}, optional
        The variational family for ``svi`` and ``bbvi``. When omitted, ``svi`` uses the
        story's recommended guide (``Model.recommended_guide``) where it names one, else
        ``"meanfield"``: Pyro's AutoNormal over the continuous sites (``"fullrank"``:
        AutoMultivariateNormal), started at a quick MAP (option ``init``). A guide
        function is checked against the story before fitting.
    seed : int
        Seeds every random number of the run: the same seed gives the same draws.
    progress : bool
        Show progress bars (never where the environment variable ``CI`` is true).
    drop_incomplete : bool
        Drop data rows with a NaN or infinite value instead of raising (see
        :meth:`Model.prepare_data`).
    log_likelihood : bool or None
        Store the pointwise log-likelihood (the ``log_likelihood`` group: one value per
        draw and observed value, which LOO, WAIC and ``compare`` read). ``None`` stores it
        where draws x observed values fit the budget (:data:`~ppl_notes.evaluation.
        log_likelihood_budget.POINTWISE_BUDGET`, 800 MB), ``True`` always, ``False``
        never; ``info["log_likelihood"]`` says why it is missing.
    **options
        Options of the method; an unknown one is an error listing the valid ones. A story
        may recommend defaults of its own (``Model.defaults``); these override them.

    Returns
    -------
    Posterior
        The draws, diagnostics and provenance; ``to_arviz()`` gives the DataTree.

    Examples
    --------
    >>> from ppl_notes import infer
    >>> from ppl_notes.models.conjugate import normal_mean
    >>> fit = infer(normal_mean, method="svi", steps=500, progress=False)
    """
    if method not in BACKENDS:
        raise OptionError(f"unknown method {method!r}; the methods are {sorted(BACKENDS)}")
    observed_found = None
    if not isinstance(model, Model):  # a plain Pyro model: its obs= name the data
        model, observed_found = Model.from_function(model, data)
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral):
        raise OptionTypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**32:
        raise OptionError(f"seed must be an integer in [0, 2**32), got {seed}")
    seed = int(seed)
    if not isinstance(progress, bool):
        raise OptionTypeError(f"progress must be True or False, got {progress!r}")
    progress = show_progress(progress)
    backend = BACKENDS[method]
    checked = validate(method, backend.options, {**model.defaults.get(method, {}), **options})
    if not isinstance(drop_incomplete, bool):
        raise OptionTypeError(f"drop_incomplete must be True or False, got {drop_incomplete!r}")
    prepared = model.prepare_data(data, drop_incomplete=drop_incomplete)
    first_run, prior_runs = check_data_runs(model, prepared, seed)
    model = model.observing(first_run, prepared)  # an observed site's data argument
    if guide is None and backend.guide_families:
        guide = model.recommended_guide  # the story's own, where it names one
    if isinstance(guide, str):
        if guide not in backend.guide_families:
            raise OptionError(f"guide={guide!r}: a guide named by a string is 'meanfield' "
                              "(AutoNormal), 'fullrank' (AutoMultivariateNormal) or 'lowrank' "
                              "(AutoLowRankMultivariateNormal) or 'flow' (a Real-NVP flow "
                              "started at the Gaussian fit), for method='svi'; otherwise "
                              "pass a guide function")
    elif guide is not None:
        if not backend.takes_guide:
            guided = sorted(methods_with(lambda b: b.takes_guide))
            raise OptionError(f"method {method!r} takes no guide; only {guided} do")
        if isinstance(guide, Guide) and guide.model.fn is not model.fn:
            raise StoryError(
                f"guide {guide.name!r} was written for story {guide.model.name!r}, "
                f"not {model.name!r}"
            )
        guide = _guide_in_dtype(guide, story_dtype(model))
        pyro.clear_param_store()
        with run_dtype(story_dtype(model)):
            check_pairing(model, guide, prepared)
        pyro.clear_param_store()
    if guide is None or isinstance(guide, str):  # the potential's methods: a fixed space
        require_fixed_latent_sites(model, [first_run, *prior_runs])
    facts = story_facts(model, prepared, trace=first_run)
    keep_check_points(facts, prior_runs)  # the path choice's prior points: no runs of its own
    keep_pointwise(facts, checked, log_likelihood)  # before any draw is evaluated
    if facts.subsampled and not backend.minibatch:
        plate, (size, full) = next(iter(facts.subsampled.items()))
        raise OptionError(
            f"method {method!r} uses the whole data at every step, and story "
            f"{model.name!r} draws mini-batches: plate {plate!r} takes subsample_size={size} "
            f"of its {full}. Write pyro.plate({plate!r}, {full}) for {method!r}; "
            f"{sorted(methods_with(lambda b: b.minibatch))} fit mini-batches as Pyro scales "
            "them")
    if guide is None or isinstance(guide, str):
        _require_continuous_and_enumerable(model, facts, method)
    context = RunContext(model, prepared, guide=guide, seed=seed, progress=progress,
                         options=checked, known_facts=facts,
                         pointwise_skipped=facts.pointwise_skipped)
    with run_dtype(context.dtype), fit_threads(prepared) as threads:
        run = backend.run(context)
    run.info["threads"] = threads
    _require_finite_draws(run, model)
    if facts.path is not None:  # how draws were evaluated, for every method alike
        run.info.setdefault("path", facts.path)
        run.info["path_reason"] = run.info.get("path_reason") or facts.path_reason
    if facts.value_branch is not None:
        run.info["value_branch"] = facts.value_branch
    if facts.pointwise_skipped is not None:
        run.info["log_likelihood"] = facts.pointwise_skipped
    if observed_found is not None:
        run.info["observed_from_data"] = observed_found
    run.info["dtype"] = (f"{str(model.dtype).removeprefix('torch.')}: "
                         f"{getattr(model, 'dtype_reason', 'given to @model')}")
    attrs = {
        "method": run.method,
        "model": model.name,
        "model_path": _reference(model),
        "model_module": str(getattr(model.fn, "__module__", "") or ""),
        "guide_path": _reference(guide) if guide is not None and not isinstance(guide, str)
        else "",
        "guide": run.info.get("guide") or getattr(guide, "name", None) or "",
        "sample_dims": json.dumps(list(run.sample_dims)),
        "options": json.dumps(run.options, sort_keys=True, default=str),
        "info": json.dumps(run.info, sort_keys=True, default=str),
        "discrete_sites": json.dumps(sorted(facts.discrete)),
        "log_likelihood_note": facts.pointwise_note or facts.pointwise_skipped or "",
        "seconds": float(run.seconds),
        "seed": seed,
        "partial": bool(run.partial),
        "versions": json.dumps(library_versions()),
    }
    with fit_threads(prepared):
        tree = to_datatree(run, model, prepared, attrs, facts)
        posterior = Posterior(tree, model=model, guide=None if isinstance(guide, str)
                              else guide, data=prepared, facts=facts)
        warn_about(posterior)
    return posterior


def _require_finite_draws(run, model: Model) -> None:
    """Never hand back a posterior with NaN or infinite draws: name the sites instead."""
    bad = {name: int((~np.isfinite(values)).sum()) for name, values in run.posterior.items()
           if np.issubdtype(np.asarray(values).dtype, np.floating)
           and not np.isfinite(values).all()}
    if bad:
        raise InferenceError(
            f"{run.method}: the draws of story {model.name!r} are not finite at sites "
            f"{sorted(bad)} ({', '.join(f'{k}: {v} values' for k, v in bad.items())}); the "
            "fit diverged. Lower the learning rate or step size, check the priors, or start "
            "from other initial values")


def _require_continuous_and_enumerable(model: Model, facts, method: str) -> None:
    """Check what a guide-less method can do with the story's latent sites.

    Every discrete latent site is summed out, so it must have a finite support, and a
    continuous site must be left to infer.
    """
    latent = facts.latent
    if not facts.continuous:
        raise StoryError(
            f"story {model.name!r} has no continuous latent sites for method {method!r}"
            + (f"; its discrete sites {list(latent)} have an exact posterior by enumeration: "
               "ppl_notes.exact_posterior(story, data)" if latent else
               "; it has no latent sites at all")
        )
    if facts.unenumerable:
        name = facts.unenumerable[0]
        kind = distribution_name(facts.trace.nodes[name]["fn"])
        raise StoryError(
            f"site {name!r} of story {model.name!r} is discrete with an infinite support "
            f"({kind}), so method {method!r} cannot sum it out by "
            f"enumeration. Ways out: fit it with method='svi' and a guide that samples "
            f"{name!r} (score-function gradients), or write the story with {name!r} summed "
            "out by hand and pass it as marginal=..."
        )


def _guide_in_dtype(guide, dtype: torch.dtype):
    """A float64 copy of a guide written as a float32 ``PyroModule``, for a float64 story.

    Its ``PyroParam``s are made in torch's default float32 when the user builds it, and
    meet the story's float64 values in ``x @ w``; the story's own module is copied into
    float64 for the same reason (:func:`~ppl_notes._constants.module_as_float64`). The
    user's module is left as it is.
    """
    module = guide.fn if isinstance(guide, Guide) else guide
    if (dtype != torch.float64 or not isinstance(module, torch.nn.Module)
            or constants_dtype(module)[0] != torch.float32):
        return guide
    copied = module_as_float64(module)
    return Guide(copied, guide.model, guide.name) if isinstance(guide, Guide) else copied


def _reference(thing) -> str:
    """``module:attribute`` under which a story or guide can be imported, or ''."""
    module = getattr(getattr(thing, "fn", thing), "__module__", None)
    target = sys.modules.get(module) if module and module != "__main__" else None
    if target is not None:
        for attribute, value in vars(target).items():
            if value is thing:
                return f"{module}:{attribute}"
    return ""
