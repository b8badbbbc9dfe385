r"""Predictions for new data from a fitted (or saved and loaded) posterior.

For new covariates or new units :math:`\tilde x`, each posterior draw :math:`\theta_s` of
the story's *global* sites (those outside every plate that holds an observed site) is
held fixed and the story is run on :math:`\tilde x`:

* an observed site given no value is drawn from :math:`p(\tilde y \mid \theta_s, \tilde
  x)`: the posterior predictive;
* a discrete per-unit site (a person's gender) whose unit has an observed value is drawn
  from its exact conditional :math:`p(\tilde z \mid \tilde y, \theta_s)` (Pyro's
  ``infer_discrete``): the notes' "someone is 180 cm: how likely male?";
* any other per-unit site is drawn from its prior given :math:`\theta_s` (a new unit's
  random effect; observations of it are not used for continuous sites).

The story comes with the posterior: in memory, or attached when loading
(:func:`ppl_notes.load`: ``model=``, or a shipped story from ppl_notes' registry), so a
saved result predicts in a fresh process without its training data. New data are prepared
as :func:`ppl_notes.infer` prepares data, and checked against the data of the fit: an
argument the fit used as integers (an index, ``a[group]``) is made integers again, and
each argument keeps the fit's number of dims, trailing shape and kind (numbers or a
mask), or a :class:`~ppl_notes.errors.DataError` names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
import xarray as xr

from ppl_notes._callables import story_signature
from ppl_notes._dtype import run_dtype
from ppl_notes._sites import is_enumerable, sample_sites
from ppl_notes.arviz_io import infer_dims
from ppl_notes.data_preparation import to_tensor
from ppl_notes.errors import DataError, OptionError, StoryError
from ppl_notes.evaluation.draws import recover_discrete_sites
from ppl_notes.evaluation.facts import story_facts
from ppl_notes.evaluation.paths import choose_path
from ppl_notes.predictive import _dtype, _thinned_indices

__all__ = ["predict"]


def predict(posterior, new_data: Mapping | pd.DataFrame, num_draws: int = 500,
            seed: int = 0) -> xr.Dataset:
    """Draws of every site of the story on ``new_data`` (module docstring).

    Parameters
    ----------
    posterior : Posterior
        A fitted or loaded posterior whose story is available.
    new_data : dict or pandas.DataFrame
        Keyword arguments of the story: new covariates, and observed values where known
        (leave an observed argument out to predict it).
    num_draws : int
        At most this many posterior draws are used (thinned evenly, chains alike).
    seed : int
        Seeds the predictive draws: the same seed gives the same predictions, in this
        session or after :func:`ppl_notes.load`.

    Returns
    -------
    xarray.Dataset
        One variable per predicted site, with the posterior's sample dims; also stored
        in ``posterior.tree`` as the ``predictions`` group (ArviZ's name for it).
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise OptionError(f"num_draws must be an integer >= 1, got {num_draws!r}")
    model = story_of(posterior)
    data = _new_data(model, new_data, _fitted_data(posterior))
    index, shape = _thinned_indices(posterior, num_draws)
    with run_dtype(model.dtype):
        try:
            first = _trace(model, data, {}, seed)
        except (IndexError, RuntimeError, ValueError, TypeError) as error:
            shapes = ", ".join(f"{k}: shape {tuple(np.shape(v))}" for k, v in data.items()
                               if v is not None)
            raise DataError(
                f"predict: story {model.name!r} cannot run on the new data ({shapes}): "
                f"{str(error).splitlines()[0]}. Give each argument as the fit had it") from error
        _require_the_fitted_sites(model, first, posterior)
        fixed = _global_sites(first, posterior, set(model.observed))
        sites = sample_sites(first)
        given = [n for n, s in sites.items() if s["is_observed"]]
        draws = {name: posterior.draws(name)[index] for name in fixed}
        local_discrete = [n for n, s in sites.items()
                          if not s["is_observed"] and n not in fixed and is_enumerable(s["fn"])]
        nesting = max((len(s["cond_indep_stack"]) for s in sites.values()), default=0)
        to_predict = [n for n, s in sites.items() if n not in fixed and not s["is_observed"]]
        if local_discrete and given and set(to_predict) <= set(local_discrete):
            try:
                batched = _recovered_at_once(model, data, draws, seed)
            except (IndexError, RuntimeError, ValueError, TypeError) as error:
                raise _uncomputable(model, new_data, "", error) from error
            if batched is not None:
                return _as_predictions(posterior, model, first, batched, shape)
        rows: dict[str, list[np.ndarray]] = {}
        with torch.no_grad(), pyro.poutine.seed(rng_seed=seed):
            for row in range(len(index)):
                values = {n: torch.as_tensor(draws[n][row], dtype=_dtype(model, draws[n]))
                          for n in fixed}
                story = poutine.condition(model, data=values)
                if local_discrete and given:
                    from pyro.infer import config_enumerate, infer_discrete

                    story = infer_discrete(config_enumerate(story, "parallel"),
                                           first_available_dim=-(nesting + 1), temperature=1)
                try:
                    trace = poutine.trace(story).get_trace(**data)
                except (IndexError, RuntimeError, ValueError, TypeError) as error:
                    raise _uncomputable(model, new_data, f" at posterior draw {row}",
                                        error) from error
                for name, site in sample_sites(trace).items():
                    if name not in fixed and not site["is_observed"]:
                        value = site["value"].detach().cpu()
                        if name in sites and value.numel() == sites[name]["value"].numel():
                            # infer_discrete drops a plate of size 1 from its draws
                            value = value.reshape(sites[name]["value"].shape)
                        rows.setdefault(name, []).append(value.numpy())
    if not rows:
        raise OptionError(f"story {model.name!r} has nothing to predict on these data: every "
                          "site is either a global parameter or given")
    return _as_predictions(posterior, model, first, {
        name: np.stack(values) for name, values in rows.items()}, shape)


def _uncomputable(model, new_data, where: str, error: Exception) -> DataError:
    """The error for new data the story cannot compute at the posterior's draws."""
    given_values = ", ".join(f"{k}={np.asarray(v).ravel()[:3].tolist()}"
                             for k, v in new_data_of(new_data).items())
    return DataError(f"predict: story {model.name!r} cannot run on the new data "
                     f"({given_values}){where}: {str(error).splitlines()[0]} (a value outside "
                     "what the story can compute, such as one that overflows)")


def _recovered_at_once(model, data, draws: dict[str, np.ndarray], seed: int
                       ) -> dict[str, np.ndarray] | None:
    """The discrete sites drawn from p(z | x, theta) for every posterior draw in one run.

    The recovery ``infer()`` uses for its own draws
    (:func:`~ppl_notes.evaluation.draws.recover_discrete_sites`), on the path the story is
    checked to take on these data (a plate over the draws, vmap, or one at a time); None
    where the story's sites on the new data are not a fit's (no continuous latent site).
    Galton's heights, 500 draws at 3 heights: 22 s one draw at a time before.
    """
    facts = story_facts(model, data)
    if not facts.discrete or not set(facts.continuous) <= set(draws):
        return None
    path = choose_path(model, data, facts)
    values = {n: torch.as_tensor(draws[n], dtype=facts.dtype) for n in facts.continuous}
    with torch.no_grad(), pyro.poutine.seed(rng_seed=seed):
        return recover_discrete_sites(model, data, facts, values, path)


def _as_predictions(posterior, model, first, drawn: dict[str, np.ndarray],
                    shape: tuple[int, ...]) -> xr.Dataset:
    """The predicted sites ``(draws, ...)`` as a Dataset with the posterior's sample dims.

    It is kept in ``posterior.tree`` as the ``predictions`` group (ArviZ's name for it).
    """
    from arviz_base import dict_to_dataset

    arrays = {name: np.asarray(values).reshape(shape + np.shape(values)[1:])
              for name, values in drawn.items()}
    dims = {k: v for k, v in infer_dims(model, first).items() if k in arrays}
    result = dict_to_dataset(arrays, dims=dims, sample_dims=list(posterior.sample_dims),
                             inference_library=None, check_conventions=False)
    posterior.tree["predictions"] = xr.DataTree(result)
    return result


def new_data_of(new_data) -> dict:
    """``new_data`` as a mapping of argument to values (a DataFrame's columns)."""
    if isinstance(new_data, pd.DataFrame):
        return {column: new_data[column].to_numpy() for column in new_data.columns}
    return dict(new_data)


def story_of(posterior):
    """The posterior's story, or an error that says how to make it importable."""
    if posterior.model is not None:
        return posterior.model
    attrs = posterior.tree.attrs
    name = attrs.get("model", "?")
    where = attrs.get("model_path") or "a script or notebook"
    raise StoryError(
        f"story {name!r} ({where}) is not attached: a result file holds values and never "
        "names code to import, so give the story when loading: "
        f"ppl_notes.load(path, model={name}) (on the command line: --model module:attr)")


def _fitted_data(posterior) -> dict[str, np.ndarray]:
    """The arrays the fit was given: in memory, or the file's data groups."""
    if posterior.data is not None:
        return {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v)
                for k, v in posterior.data.items() if v is not None and not np.isscalar(v)}
    out = {}
    for group in ("constant_data", "observed_data"):
        if group in posterior.tree.children:
            out.update({k: v.values for k, v in posterior.tree[group].data_vars.items()})
    return out


def _new_data(model, new_data, fitted: Mapping[str, np.ndarray] | None = None
              ) -> dict[str, Any]:
    """``new_data`` prepared as ``infer`` prepares data, and checked against ``fitted``."""
    import inspect


    if isinstance(new_data, pd.DataFrame):
        new_data = {column: new_data[column].to_numpy() for column in new_data.columns}
    if not isinstance(new_data, Mapping):
        raise DataError(f"predict: new_data must be a dict or a pandas DataFrame, not "
                        f"{type(new_data).__name__}")
    fitted = fitted or {}
    data = {}
    for key, value in new_data.items():
        if key not in model.parameters:
            raise DataError(f"predict: story {model.name!r} has no argument {key!r}; its "
                            f"keyword arguments are {list(model.parameters)}")
        data[key] = to_tensor(model, key, value)
        if key in fitted and torch.is_tensor(data[key]):
            data[key] = _like_fitted(model.name, key, data[key], fitted[key])
    signature = story_signature(model.fn).parameters
    missing = [name for name, parameter in signature.items()
               if parameter.default is inspect.Parameter.empty and name not in data
               and name not in model.observed_arguments.values()]
    if missing:
        raise DataError(f"predict: story {model.name!r} needs argument(s) {missing} (the fit "
                        "had them): give their new values, one row per new unit")
    for argument in model.observed_arguments.values():
        if argument:
            data.setdefault(argument, None)
    return data


def _like_fitted(story: str, key: str, value: torch.Tensor, fitted: np.ndarray
                 ) -> torch.Tensor:
    """A new argument in the fit's kind and number of dims, or a DataError naming it."""
    fitted = np.asarray(fitted)
    if fitted.ndim >= 1 and (value.dim() != fitted.ndim
                             or tuple(value.shape[1:]) != fitted.shape[1:]):
        raise DataError(
            f"predict: argument {key!r} of story {story!r} has shape {tuple(value.shape)} "
            f"here and {fitted.shape} in the fit: give one row per new unit, each of shape "
            f"{fitted.shape[1:]}")
    if (value.dtype == torch.bool) != (fitted.dtype == bool):
        raise DataError(
            f"predict: argument {key!r} of story {story!r} was "
            f"{'a mask (booleans)' if fitted.dtype == bool else 'numbers'} in the fit and is "
            f"{'booleans' if value.dtype == torch.bool else 'numbers'} here")
    if np.issubdtype(fitted.dtype, np.integer):
        if value.is_floating_point() and not bool((value == value.round()).all()):
            raise DataError(
                f"predict: argument {key!r} of story {story!r} holds integers in the fit (an "
                "index, as in a[group]); the new values must be integers too")
        return value.long()
    return value


def _trace(model, data, values, seed):
    with torch.no_grad(), pyro.poutine.seed(rng_seed=seed):
        return poutine.trace(poutine.condition(model, data=values)).get_trace(**data)


def _require_the_fitted_sites(model, trace, posterior) -> None:
    """Refuse a story whose sites are not the fitted posterior's (a renamed or other story).

    Every global latent site of the story (``trace``: a run on the new data) must have
    posterior draws, and every variable of the posterior must be a site of the story:
    a site without draws would be drawn from its prior, silently (a story that renamed
    ``p`` to ``bias`` predicted from ``bias``'s prior).
    """
    sites = sample_sites(trace)
    observed = set(model.observed)
    data_plates = {frame.name for name, site in sites.items() if name in observed
                   for frame in site["cond_indep_stack"]}
    stored = list(posterior.tree["posterior"].data_vars)
    latent = [n for n, site in sites.items()
              if not site["is_observed"] and not {f.name for f in site["cond_indep_stack"]}
              & data_plates]
    known = set(sites) | {n for n, site in trace.nodes.items() if site["type"] == "sample"}
    without_draws = [n for n in latent if n not in stored]
    not_in_story = [n for n in stored if n not in known]
    if without_draws or not_in_story:
        fitted = posterior.tree.attrs.get("model", "?")
        raise StoryError(
            f"predict: story {model.name!r} is not the story this posterior was fitted with "
            f"({fitted!r}): its global latent sites are {latent}, the posterior's variables "
            f"are {stored}"
            + (f"; {without_draws} have no posterior draws (they would be drawn from their "
               "prior)" if without_draws else "")
            + (f"; {not_in_story} are not sites of the story" if not_in_story else "")
            + ". Give the story the fit used (ppl_notes.load(path, model=...), --model)")


def _global_sites(trace, posterior, observed: set[str]) -> list[str]:
    """Posterior sites outside every plate that holds an observed site.

    The data's plates count whether or not their observed site is given a value here.
    """
    sites = sample_sites(trace)
    data_plates = {frame.name for name, site in sites.items() if name in observed
                   for frame in site["cond_indep_stack"]}
    stored = set(posterior.tree["posterior"].data_vars)
    return [name for name, site in sites.items()
            if not site["is_observed"] and name in stored
            and not {f.name for f in site["cond_indep_stack"]} & data_plates]

