"""``infer()``: one entry point that checks its arguments and dispatches to a back end.

The facade holds no algorithm: a registry maps each method name to its module, which
declares its options (``OPTIONS``) and runs (``run``). Everything a user can get wrong is
checked here, before any inference starts: the method, each option's name, type and
range, the data against the story, and the guide against the story.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Mapping
from typing import Any

import pyro
import torch

from ppl_notes.arviz_io import to_datatree
from ppl_notes.errors import OptionError, OptionTypeError, StoryError
from ppl_notes.inference._options import validate
from ppl_notes.posterior import Posterior
from ppl_notes.story import Guide, Model, check_pairing

__all__ = ["infer", "METHODS"]

#: method name -> back-end module (each has ``OPTIONS`` and ``run``).
METHODS = {
    "svi": "ppl_notes.inference.svi",
    "nuts": "ppl_notes.inference.nuts",
}


def infer(
    model: Model,
    data: Mapping | Any = None,
    *,
    method: str = "svi",
    guide=None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Posterior:
    """Infer the posterior of a story's latent sites given data.

    Parameters
    ----------
    model : Model
        A story made with :func:`ppl_notes.model`.
    data : dict, pandas.DataFrame or None
        Observed data and other keyword arguments of the story; ``None`` uses the story's
        default data.
    method : {"svi", "nuts"}
        The back end. ``svi``: stochastic variational inference (options ``steps``,
        ``learning_rate``, ``num_draws``, ``num_particles``, ``elbo``). ``nuts``: the
        No-U-Turn sampler (options ``chains``, ``warmup``, ``draws``, ``target_accept``,
        ``max_tree_depth``, ``engine``, ``init``, ``processes``).
    guide : Guide or callable, optional
        The variational family for ``svi``; AutoNormal over the continuous sites when
        omitted. Checked against the story before fitting.
    seed : int
        Seeds every random number of the run: the same seed gives the same draws.
    progress : bool
        Show progress bars.
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
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; the methods are {sorted(METHODS)}")
    if not isinstance(model, Model):
        raise StoryError(
            f"infer() needs a story made with @ppl_notes.model (it names the observed "
            f"sites), got {type(model).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionTypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not isinstance(progress, bool):
        raise OptionTypeError(f"progress must be True or False, got {progress!r}")
    backend = importlib.import_module(METHODS[method])
    checked = validate(method, backend.OPTIONS, {**model.defaults.get(method, {}), **options})
    prepared = model.prepare_data(data)
    if guide is not None:
        if method != "svi":
            raise OptionError(f"method {method!r} takes no guide; only 'svi' does")
        if isinstance(guide, Guide) and guide.model.fn is not model.fn:
            raise StoryError(
                f"guide {guide.name!r} was written for story {guide.model.name!r}, "
                f"not {model.name!r}"
            )
        pyro.clear_param_store()
        check_pairing(model, guide, prepared)
        pyro.clear_param_store()
    run = backend.run(model, prepared, guide=guide, seed=seed, progress=progress,
                      options=checked)
    attrs = {
        "method": run.method,
        "model": model.name,
        "model_path": _reference(model),
        "guide": run.info.get("guide") or getattr(guide, "name", None) or "",
        "sample_dims": json.dumps(list(run.sample_dims)),
        "options": json.dumps(run.options, sort_keys=True, default=str),
        "info": json.dumps(run.info, sort_keys=True, default=str),
        "discrete_sites": json.dumps(sorted(model.discrete_latent_sites(prepared))),
        "seconds": float(run.seconds),
        "seed": seed,
        "partial": bool(run.partial),
        "versions": json.dumps(_versions()),
    }
    tree = to_datatree(run, model, prepared, attrs)
    return Posterior(tree, model=model, guide=guide, data=prepared)


def _reference(model: Model) -> str:
    module = getattr(model.fn, "__module__", None)
    target = sys.modules.get(module) if module and module != "__main__" else None
    if target is not None:
        for attribute, value in vars(target).items():
            if value is model:
                return f"{module}:{attribute}"
    return ""


def _versions() -> dict[str, str]:
    import arviz_base

    from ppl_notes import __version__

    return {"ppl_notes": __version__, "pyro": pyro.__version__, "torch": torch.__version__,
            "arviz_base": arviz_base.__version__}
