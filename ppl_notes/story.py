"""The DSL: ``@model`` and ``@guide`` turn plain Pyro functions into stories.

A generative story (notes §2.a) is a Pyro model: latent variables are drawn first, the
observed ones from them. :class:`Model` keeps the function callable as it is, so every
Pyro tool still works on it, and adds what a user of the story needs: its name and text,
which sites are observed, default data, a table of its sites, the *generation* direction
(:meth:`Model.simulate`, :meth:`Model.prior_predictive`) and the model/guide pairing
check run before any inference.

Data conventions: the story's observed sites are keyword arguments of the function with
the same name (``def heights(height=None, ...)`` observes ``height``). Data arrive as a
dict or a pandas DataFrame whose keys are keyword arguments of the function; arrays
become tensors of the story's dtype once, scalars pass through.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from ppl_notes._callables import (
    callable_name,
    reduce_by_reference,
    story_signature,
)
from ppl_notes._constants import constants_dtype, module_as_float64
from ppl_notes._dtype import run_dtype
from ppl_notes._sites import (
    distribution_name,
    guess_max_plate_nesting,
    sample_sites,
    support_name,
    trace_model,
)
from ppl_notes.checks import check_data, check_pairing
from ppl_notes.data_preparation import observed_from_data, prepare_data
from ppl_notes.errors import DataError, StoryError

logger = logging.getLogger(__name__)

__all__ = ["Model", "Guide", "model", "guide", "check_pairing"]


class Model:
    """A generative story: a Pyro model with a name, observed sites and default data.

    Parameters
    ----------
    fn : callable
        The Pyro model. Data and settings are keyword arguments; observed sites take
        ``None`` when the story is run forwards (generation).
    observed : str, sequence of str, or mapping
        Names of the observed sample sites. A site named like a keyword argument of
        ``fn`` takes its data from that argument; for ``pyro.sample("obs", ...,
        obs=data)`` give ``{"obs": "data"}`` (site: argument), or just ``"obs"``: the
        argument is then found the first time the story runs on data.
    data : callable or mapping, optional
        Default data: a mapping, or a loader returning one (called lazily).
    dims : mapping, optional
        Names of the *event* dimensions of sites, e.g. ``{"mu": ["components"]}``.
        Batch dimensions are named after the Pyro plates the site is in.
    coords : callable, optional
        ``coords(data) -> dict`` giving coordinate values for named dims.
    name : str, optional
        Defaults to the function's name.
    fixed : mapping, optional
        Keyword arguments fixed for every call (see :meth:`configure`).
    marginal : callable, optional
        The same story with its discrete latent sites summed out by hand (same
        arguments, same continuous sites). NUTS and SVI use it for the log density --
        fewer operations than Pyro's enumeration -- while the discrete sites are still
        drawn per posterior draw from the full story. It must define the same density;
        a test compares the two.
    dtype : torch.dtype, optional
        The dtype the story runs in: data become tensors of it, and the story runs with
        it as torch's default dtype, so constants written as ``torch.ones(3)`` or
        ``dist.Beta(5., 5.)`` agree with the data. Not given: float64, or float32 where
        every floating tensor the story carries (closure, globals, a ``PyroModule``'s
        weights and ``PyroSample`` priors) is float32 (:mod:`ppl_notes._constants`);
        ``dtype_reason`` says which, and ``infer``'s ``info["dtype"]`` too.
    defaults : mapping, optional
        Per-method option defaults the story recommends, e.g.
        ``{"nuts": {"target_accept": 0.9}}`` for a posterior with a narrow tail; the
        user's options override them.
    guide : str, optional
        The variational family the story recommends for ``method="svi"`` when the user
        gives none, as ``"module:attribute"`` (imported on first use, so a story and its
        guides can live in modules that import each other), e.g.
        ``"ppl_notes.guides.heights:fullrank"``.
    m_step : callable, optional
        The closed-form maximum-likelihood M-step of EM:
        ``m_step(data, responsibilities) -> {site: value}``, where ``data`` are the
        story's prepared keyword arguments and ``responsibilities`` maps each discrete
        site to its E-step posterior q(z_i = k) = p(z_i = k | x_i, theta),
        shape ``(K, *plate shape)``. ``method="em"`` uses gradient steps without it.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        observed: str | tuple[str, ...] | list[str] | Mapping[str, str],
        data: Callable[[], Mapping] | Mapping | None = None,
        dims: Mapping[str, list[str]] | None = None,
        coords: Callable[[Mapping], dict] | None = None,
        name: str | None = None,
        fixed: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        marginal: Callable | None = None,
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        m_step: Callable | None = None,
        guide: str | None = None,
    ) -> None:
        self.fn = fn
        if guide is not None and (not isinstance(guide, str) or (
                ":" not in guide and guide not in ("meanfield", "fullrank", "lowrank"))):
            raise StoryError(f"guide= takes a reference 'module:attribute' or an autoguide's "
                             f"name ('meanfield', 'fullrank', 'lowrank'), got {guide!r}")
        self._guide_reference = guide
        if isinstance(observed, str):
            observed = (observed,)
        if not isinstance(observed, Mapping):
            observed = {site: site for site in observed}
        self.observed = tuple(observed)
        self._default_data = data
        self.dims = dict(dims or {})
        self._coords = coords
        self.name = name or callable_name(fn)
        self.fixed = dict(fixed or {})
        if dtype is None:
            dtype, self.dtype_reason = constants_dtype(fn)
            if isinstance(fn, torch.nn.Module) and dtype == torch.float32:
                self.fn = fn = module_as_float64(fn)
                dtype, self.dtype_reason = torch.float64, (
                    "float64: a copy of the module, its float32 weights and priors cast")
        else:
            self.dtype_reason = "given to @model"
        self.dtype = dtype
        self._marginal_fn = marginal
        self.m_step = m_step
        self._covariates_cache: dict[str, Any] | None = None
        self.defaults = {method: dict(options) for method, options in (defaults or {}).items()}
        self.parameters = tuple(story_signature(fn).parameters)
        if inspect.isfunction(fn):
            functools.update_wrapper(self, fn)
        else:  # a PyroModule, a partial, a callable object: its doc, not its attributes
            self.__doc__ = getattr(fn, "__doc__", None)
        #: site -> the keyword argument holding its data (None until found by a run)
        self.observed_arguments: dict[str, str | None] = {
            site: (argument if argument in self.parameters else None)
            for site, argument in observed.items()}
        for site, argument in observed.items():
            if argument != site and argument not in self.parameters:
                raise StoryError(
                    f"story {self.name!r}: observed site {site!r} takes its data from "
                    f"{argument!r}, which is not a keyword argument of the function; its "
                    f"arguments are {list(self.parameters)}"
                )
        for key in self.fixed:
            self._check_argument(key, "fixed argument")

    @classmethod
    def from_function(cls, fn: Callable, data: Mapping | pd.DataFrame | None
                      ) -> tuple[Model, dict[str, str]]:
        """A story for a Pyro model passed without :func:`model`: what is observed, found.

        The model runs once on ``data``; a sample site whose ``obs=`` is one of the data
        arguments (the tensor itself, or its values) is observed, with that argument's
        data, as NumPyro's ``MCMC.run(key, **data)`` reads it. Sites observed with a
        constant are left as they are.

        Returns
        -------
        (Model, dict)
            The story, and ``{site: argument}`` for each observed site found.

        Raises
        ------
        StoryError
            For a callable that is not one, or one whose ``obs=`` takes no data argument.
        DataError
            Without data, or with data the model cannot run on.
        """
        if not callable(fn):
            raise StoryError(f"infer() needs a Pyro model: a function, a PyroModule or a "
                             f"story made with @ppl_notes.model; got {type(fn).__name__}")
        probe = cls(fn, observed=())
        if data is None:
            raise DataError(f"infer({probe.name}): a model given without @ppl_notes.model "
                            "has no default data; pass data={argument: values}")
        observed = observed_from_data(probe, probe.prepare_data(data))
        return cls(fn, observed=observed), observed

    def __call__(self, *args, **kwargs):
        """Run the story as a plain Pyro model."""
        return self.fn(*args, **{**self.fixed, **kwargs})

    def __repr__(self) -> str:
        return f"<Model {self.name!r} observing {list(self.observed)}>"

    def __reduce__(self):
        return reduce_by_reference(self)

    @property
    def marginal(self) -> Model:
        """The story with discrete sites summed out by hand, or the story itself."""
        if self._marginal_fn is None:
            return self
        marginal = Model(self._marginal_fn, observed=self._observed_spec(),
                         data=self._default_data, dims=self.dims, coords=self._coords,
                         name=f"{self.name} (marginal)", fixed=self.fixed, dtype=self.dtype)
        marginal.dtype_reason = self.dtype_reason
        return marginal

    @property
    def recommended_guide(self) -> Guide | None:
        """The guide the story recommends for SVI (``guide=`` of :func:`model`), or None.

        A ``"module:attribute"`` reference is imported; an autoguide's name
        (``"meanfield"``, ``"fullrank"``, ``"lowrank"``) is returned as it is.
        """
        if self._guide_reference is None:
            return None
        if self._guide_reference in ("meanfield", "fullrank", "lowrank"):
            return self._guide_reference
        module, _, attribute = self._guide_reference.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise StoryError(f"story {self.name!r} recommends guide "
                             f"{self._guide_reference!r}, which cannot be imported: "
                             f"{error}") from error

    @property
    def story(self) -> str:
        """The generative story, in words: the function's docstring."""
        return inspect.cleandoc(self.fn.__doc__ or "")

    def configure(self, **fixed: Any) -> Model:
        """Return the same story with some keyword arguments fixed (e.g. its priors).

        Examples
        --------
        >>> from ppl_notes.models import heights
        >>> three = heights.model.configure(num_groups=3)
        """
        for key in fixed:
            self._check_argument(key, "argument")
        configured = Model(
            self.fn,
            observed=self._observed_spec(),
            data=self._default_data,
            dims=self.dims,
            coords=self._coords,
            name=self.name,
            fixed={**self.fixed, **fixed},
            dtype=self.dtype,
            marginal=self._marginal_fn,
            defaults=self.defaults,
            m_step=self.m_step,
            guide=self._guide_reference,
        )
        configured.dtype_reason = self.dtype_reason
        return configured

    def _observed_spec(self) -> dict[str, str]:
        return {site: argument or site for site, argument in self.observed_arguments.items()}

    def _check_argument(self, key: str, what: str) -> None:
        if key not in self.parameters:
            raise DataError(
                f"story {self.name!r} has no {what} {key!r}; "
                f"its keyword arguments are {list(self.parameters)}"
            )

    # -- data ---------------------------------------------------------------------
    def default_data(self) -> dict[str, Any]:
        """The story's default data set (e.g. Galton's heights), as raw values."""
        if self._default_data is None:
            raise DataError(
                f"story {self.name!r} has no default data: pass data for "
                f"{list(self.observed)}"
            )
        source = self._default_data
        raw = source() if callable(source) else source
        return dict(raw)

    def prepare_data(self, data: Mapping | pd.DataFrame | None = None,
                     drop_incomplete: bool = False) -> dict[str, Any]:
        """Check data against the story and turn arrays into tensors, once.

        Parameters
        ----------
        data : dict, pandas.DataFrame or None
            ``None`` means the story's default data. Keys (or columns) must be keyword
            arguments of the story.
        drop_incomplete : bool
            Drop the rows (entries along the first axis, shared by every array of that
            length, e.g. the columns of a data frame) where any value is NaN or infinite,
            instead of raising. Valid where rows are exchangeable observations of the
            story's outermost plate; the number dropped is logged.

        Returns
        -------
        dict
            Keyword arguments for the model: tensors for arrays, scalars as they are.

        Raises
        ------
        DataError
            For a key the story does not have, an empty, non-numeric or non-finite
            array, or an observed site without data.
        """
        return prepare_data(self, data, drop_incomplete)

    def check_data(self, data: dict[str, Any]):
        """Run the story once on prepared data and name whatever does not fit.

        See :func:`ppl_notes.checks.check_data`; returns the run (a Pyro trace).
        """
        return check_data(self, data)

    def coords(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Coordinate values for named dims, computed from the data."""
        return dict(self._coords(data)) if self._coords is not None else {}

    # -- inspection ---------------------------------------------------------------
    def max_plate_nesting(self, data: Mapping[str, Any]) -> int:
        """The number of batch dims the story's plates use (for enumeration)."""
        return guess_max_plate_nesting(self, data)

    def trace(self, data: Mapping[str, Any] | None = None, seed: int = 0):
        """One run of the story on ``data`` (default data when omitted), as a Pyro trace."""
        return trace_model(self, self.prepare_data(data), seed)

    def sites(self, data: Mapping | None = None) -> pd.DataFrame:
        """A table of the story's sample sites.

        Columns: ``name``, ``kind`` (latent/observed), ``distribution``, ``support``,
        ``shape`` (of one value), ``plates``, ``discrete``.
        """
        trace = self.trace(data)
        rows = []
        for name, site in sample_sites(trace).items():
            rows.append(
                {
                    "name": name,
                    "kind": "observed" if site["is_observed"] else "latent",
                    "distribution": distribution_name(site["fn"]),
                    "support": support_name(site["fn"].support),
                    "shape": tuple(site["value"].shape),
                    "plates": tuple(f.name for f in site["cond_indep_stack"]),
                    "discrete": bool(site["fn"].support.is_discrete),
                }
            )
        return pd.DataFrame(rows, columns=["name", "kind", "distribution", "support", "shape",
                                           "plates", "discrete"])

    # -- generation (notes §2.a) -------------------------------------------------
    def simulate(self, seed: int = 0, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the story forwards once: draw latent values, then a data set from them.

        Keyword arguments are passed to the story (e.g. ``num_people=500``). Covariates
        of the default data (arguments that are not observed sites, such as each
        school's standard error) are used unless given. Observed sites are left free, so
        this is the notes' *generation* direction.

        Returns
        -------
        dict
            Every sample site's value, latent and observed.
        """
        trace = self.forward_trace(seed, **kwargs)
        return {name: site["value"].detach() for name, site in sample_sites(trace).items()}

    def forward_trace(self, seed: int = 0, **kwargs: Any):
        """The Pyro trace of one run forwards: :meth:`simulate`'s, every site whole."""
        covariates = self._default_covariates()
        free = {argument: None for argument in self.observed_arguments.values() if argument}
        with pyro.poutine.seed(rng_seed=seed), run_dtype(self.dtype):
            return poutine.trace(self).get_trace(**{**covariates, **free, **kwargs})

    def _default_covariates(self) -> dict[str, Any]:
        if self._default_data is None:
            return {}
        if self._covariates_cache is None:
            defaults = self.prepare_data(None)
            self._covariates_cache = {k: v for k, v in defaults.items()
                                      if k not in self.observed_arguments.values()}
        return dict(self._covariates_cache)

    def prior_predictive(
        self, num_samples: int = 500, seed: int = 0, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Draw ``num_samples`` data sets from the prior story.

        Returns
        -------
        dict of numpy arrays
            Each site's draws, with a leading sample dimension.
        """
        draws = [self.simulate(seed=seed + i, **kwargs) for i in range(num_samples)]
        return {name: np.stack([d[name].numpy() for d in draws]) for name in draws[0]}

    def render(self, data: Mapping | None = None):
        """Draw the story's graph (needs the ``graphviz`` package and binary)."""
        try:
            import graphviz  # noqa: F401
        except ImportError as error:  # pragma: no cover - optional dependency
            raise ImportError("Model.render needs the 'graphviz' package") from error
        prepared = self.prepare_data(data)
        return pyro.render_model(self, model_kwargs=prepared, render_distributions=True)


class Guide:
    """A variational family for one story: a Pyro guide that knows its model.

    Parameters
    ----------
    fn : callable
        The Pyro guide; it takes the same keyword arguments as the model.
    model : Model
        The story it approximates the posterior of.
    name : str, optional
        Defaults to the function's name.
    """

    def __init__(self, fn: Callable, model: Model, name: str | None = None) -> None:
        if not isinstance(model, Model):
            raise StoryError(
                f"@guide needs a story made with @model, got {type(model).__name__}"
            )
        self.fn = fn
        self.model = model
        self.name = name or callable_name(fn)
        if not isinstance(fn, torch.nn.Module):
            functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        """Run the guide as a plain Pyro guide."""
        return self.fn(*args, **{**self.model.fixed, **kwargs})

    def __repr__(self) -> str:
        return f"<Guide {self.name!r} for {self.model.name!r}>"

    def __reduce__(self):
        return reduce_by_reference(self)


def model(
    fn: Callable | None = None,
    *,
    observed: str | tuple[str, ...] | list[str] | Mapping[str, str],
    data: Callable[[], Mapping] | Mapping | None = None,
    dims: Mapping[str, list[str]] | None = None,
    coords: Callable[[Mapping], dict] | None = None,
    name: str | None = None,
    marginal: Callable | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    m_step: Callable | None = None,
    dtype: torch.dtype | None = None,
    guide: str | None = None,
) -> Model | Callable[[Callable], Model]:
    """Declare a generative story.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> @model(observed="x")
    ... def coin(x=None, n=10):
    ...     p = pyro.sample("p", dist.Beta(1.0, 1.0))
    ...     with pyro.plate("flips", n):
    ...         pyro.sample("x", dist.Bernoulli(p), obs=x)
    """

    def wrap(function: Callable) -> Model:
        return Model(function, observed=observed, data=data, dims=dims, coords=coords,
                     name=name, marginal=marginal, defaults=defaults, m_step=m_step, dtype=dtype,
                     guide=guide)

    return wrap(fn) if fn is not None else wrap


def guide(story: Model, *, name: str | None = None) -> Callable[[Callable], Guide]:
    """Declare a variational family for ``story``; see :class:`Guide`."""

    def wrap(function: Callable) -> Guide:
        return Guide(function, story, name=name)

    return wrap
