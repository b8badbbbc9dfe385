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
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ppl_notes._callables import (
    callable_name,
    reduce_by_reference,
    story_signature,
)
from ppl_notes._constants import constants_dtype, module_as_float64
from ppl_notes._sites import (
    guess_max_plate_nesting,
    trace_model,
)
from ppl_notes.checks import check_data, check_pairing, observed_data_arguments
from ppl_notes.data_preparation import observed_from_data, prepare_data
from ppl_notes.errors import DataError, StoryError
from ppl_notes.generation import StoryViews

logger = logging.getLogger(__name__)

__all__ = ["Model", "Guide", "model", "guide", "check_pairing"]


@dataclass(frozen=True, init=False, eq=False, repr=False)
class Model(StoryViews):
    """A generative story: a Pyro model with a name, observed sites and default data.

    A story is frozen: each field is written once, when it is made (:meth:`configure`,
    :attr:`marginal` and :meth:`observing` make new ones), so a fit can never change
    the story another fit runs.

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
    dtype_reason : str, optional
        Why the dtype is what it is (kept by :meth:`configure` and :attr:`marginal`).
    m_step : callable, optional
        The closed-form maximum-likelihood M-step of EM:
        ``m_step(data, responsibilities) -> {site: value}``, where ``data`` are the
        story's prepared keyword arguments and ``responsibilities`` maps each discrete
        site to its E-step posterior q(z_i = k) = p(z_i = k | x_i, theta),
        shape ``(K, *plate shape)``. ``method="em"`` uses gradient steps without it.
    """

    fn: Callable
    observed: tuple[str, ...]
    #: site -> the keyword argument holding its data (None where only a run can tell:
    #: :meth:`observing` makes the story with it found)
    observed_arguments: dict[str, str | None]
    name: str
    dims: dict[str, list[str]]
    fixed: dict[str, Any]
    dtype: torch.dtype
    dtype_reason: str
    m_step: Callable | None
    defaults: dict[str, dict[str, Any]]
    parameters: tuple[str, ...]
    _default_data: Any
    _coords: Any
    _marginal_fn: Any
    _guide_reference: str | None

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
        dtype_reason: str | None = None,
    ) -> None:
        write = functools.partial(object.__setattr__, self)  # each field once, here
        if guide is not None and (not isinstance(guide, str) or (
                ":" not in guide and guide not in ("meanfield", "fullrank", "lowrank"))):
            raise StoryError(f"guide= takes a reference 'module:attribute' or an autoguide's "
                             f"name ('meanfield', 'fullrank', 'lowrank'), got {guide!r}")
        if isinstance(observed, str):
            observed = (observed,)
        if not isinstance(observed, Mapping):
            observed = {site: site for site in observed}
        if dtype is None:
            dtype, dtype_reason = constants_dtype(fn)
            if isinstance(fn, torch.nn.Module) and dtype == torch.float32:
                fn = module_as_float64(fn)
                dtype, dtype_reason = torch.float64, (
                    "float64: a copy of the module, its float32 weights and priors cast")
        parameters = tuple(story_signature(fn).parameters)
        name = name or callable_name(fn)
        for site, argument in observed.items():
            if argument != site and argument not in parameters:
                raise StoryError(
                    f"story {name!r}: observed site {site!r} takes its data from "
                    f"{argument!r}, which is not a keyword argument of the function; its "
                    f"arguments are {list(parameters)}"
                )
        write("fn", fn)
        write("observed", tuple(observed))
        write("observed_arguments", {site: (argument if argument in parameters else None)
                                     for site, argument in observed.items()})
        write("name", name)
        write("dims", dict(dims or {}))
        write("fixed", dict(fixed or {}))
        write("dtype", dtype)
        write("dtype_reason", dtype_reason or "given to @model")
        write("m_step", m_step)
        write("defaults", {method: dict(options) for method, options in (defaults or {}).items()})
        write("parameters", parameters)
        write("_default_data", data)
        write("_coords", coords)
        write("_marginal_fn", marginal)
        write("_guide_reference", guide)
        if inspect.isfunction(fn):  # functools.update_wrapper, written once
            for attribute in functools.WRAPPER_ASSIGNMENTS:
                if hasattr(fn, attribute):
                    write(attribute, getattr(fn, attribute))
            write("__wrapped__", fn)
        else:  # a PyroModule, a partial, a callable object: its doc, not its attributes
            write("__doc__", getattr(fn, "__doc__", None))
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
        if data is None and not story_signature(fn).parameters:
            data = {}  # a model of no arguments (GPRegression(...).model) needs none
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

    @functools.cached_property
    def marginal(self) -> Model:
        """The story with discrete sites summed out by hand, or the story itself.

        One object per story, so that its compiled potential is recorded once.
        """
        if self._marginal_fn is None:
            return self
        return self._copy(fn=self._marginal_fn, name=f"{self.name} (marginal)",
                          marginal=None, defaults=None, m_step=None, guide=None)

    def observing(self, trace, data: Mapping[str, Any]) -> Model:
        """The story with the data argument of each observed site found in ``trace``.

        A site declared observed by its name alone (``observed="obs"`` for
        ``pyro.sample("obs", ..., obs=y)``) takes its data from an argument only a run can
        tell: ``trace``, a run on ``data``. Returns the story itself where nothing was
        left to find, else a new one that knows.
        """
        found = observed_data_arguments(self, data, trace)
        return self._copy(observed={**self._observed_spec(), **found}) if found else self

    def _copy(self, **changes: Any) -> Model:
        spec = dict(fn=self.fn, observed=self._observed_spec(), data=self._default_data,
                    dims=self.dims, coords=self._coords, name=self.name, fixed=self.fixed,
                    dtype=self.dtype, marginal=self._marginal_fn, defaults=self.defaults,
                    m_step=self.m_step, guide=self._guide_reference,
                    dtype_reason=self.dtype_reason)
        spec.update(changes)
        return Model(spec.pop("fn"), **spec)

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
        return self._copy(fixed={**self.fixed, **fixed})

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
        """The story's default data set (e.g. Galton's heights), as raw values.

        A story of no argument at all whose observed sites take none holds its data
        itself (Pyro's ``GPRegression(X, y, kernel).model``): its data are ``{}``.
        """
        if self._default_data is None and not self.parameters and not any(
                self.observed_arguments.values()):
            return {}
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
