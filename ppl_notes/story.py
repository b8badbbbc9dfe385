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
import re
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

from ppl_notes._constants import constants_dtype, module_as_float64
from ppl_notes._dtype import run_dtype
from ppl_notes._sites import (
    distribution_name,
    guess_max_plate_nesting,
    is_enumerable,
    latent_sites,
    sample_sites,
    strip_independent,
    support_name,
    supports_compatible,
    trace_model,
)
from ppl_notes.errors import DataError, ModelGuideMismatchError, StoryError

_INVALID_PARAMETER = re.compile(
    r"Expected parameter (\w+) .*? of distribution (\w+)\(.*?\) to satisfy the constraint "
    r"(.+?), but found invalid values", re.DOTALL)

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
        prepared = probe.prepare_data(data)
        try:
            trace = trace_model(probe, prepared)
        except (ValueError, RuntimeError, IndexError, TypeError) as error:
            raise DataError(f"story {probe.name!r} cannot run on this data: {error}") \
                from error
        observed = {}
        for name, site in sample_sites(trace).items():
            if site["is_observed"] and not site["infer"].get("_deterministic"):
                argument = _argument_holding(site["value"], prepared)
                if argument is not None:
                    observed[name] = argument
        if not observed:
            raise StoryError(
                f"story {probe.name!r}: no sample site takes obs= from the data arguments "
                f"{list(prepared)}; pass the observations as an argument (obs=y), or "
                "declare them with @ppl_notes.model(observed=...)")
        return cls(fn, observed=observed), observed

    def __call__(self, *args, **kwargs):
        """Run the story as a plain Pyro model."""
        return self.fn(*args, **{**self.fixed, **kwargs})

    def __repr__(self) -> str:
        return f"<Model {self.name!r} observing {list(self.observed)}>"

    def __reduce__(self):
        return _reduce_by_reference(self)

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
        raw = self.default_data() if data is None else data
        if isinstance(raw, pd.DataFrame):
            if raw.empty:
                raise DataError(f"story {self.name!r}: the data frame has no rows")
            raw = {column: raw[column].to_numpy() for column in raw.columns}
        elif not isinstance(raw, Mapping):
            raise DataError(
                f"story {self.name!r}: data must be a dict or a pandas DataFrame, "
                f"not {type(raw).__name__}"
            )
        if drop_incomplete:
            raw = self._drop_incomplete_rows(raw)
        prepared = {}
        for key, value in raw.items():
            if key not in self.parameters:
                raise DataError(
                    f"story {self.name!r} has no site or argument {key!r} to take data; "
                    f"its keyword arguments are {list(self.parameters)} "
                    f"(observed sites: {list(self.observed)})"
                )
            prepared[key] = self._to_tensor(key, value)
        for site, argument in self.observed_arguments.items():
            if argument is not None and prepared.get(argument) is None:
                raise DataError(
                    f"story {self.name!r}: observed site {site!r} has no data; pass "
                    f"data={{{argument!r}: ...}} or leave data=None for the default data"
                )
        return prepared

    def _drop_incomplete_rows(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        arrays = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                  for k, v in raw.items() if v is not None and not np.isscalar(v)}
        numeric = {k: a for k, a in arrays.items()
                   if a.ndim >= 1 and (np.issubdtype(a.dtype, np.number) or a.dtype == bool)}
        lengths = {len(numeric[k]) for k in self.observed_arguments.values() if k in numeric}
        if len(lengths) != 1:
            raise DataError(
                f"story {self.name!r}: drop_incomplete needs observed data with one shared "
                f"number of rows; got lengths {sorted(lengths) or 'none'}")
        rows = lengths.pop()
        keep = np.ones(rows, dtype=bool)
        for array in numeric.values():
            if len(array) == rows:
                keep &= np.isfinite(array.astype(float).reshape(rows, -1)).all(axis=1)
        if not keep.any():
            raise DataError(f"story {self.name!r}: every one of the {rows} rows has a NaN "
                            "or infinite value; nothing is left after dropping them")
        if not keep.all():
            logger.info("story %r: dropped %d of %d rows with NaN or infinite values",
                        self.name, rows - int(keep.sum()), rows)
        return {k: (np.asarray(v)[keep] if k in numeric and len(numeric[k]) == rows else v)
                for k, v in raw.items()}

    def check_data(self, data: dict[str, Any]):
        """Run the story once on prepared data and name whatever does not fit.

        Integer-valued covariates that the story uses as indices (``locs[group]``) become
        ``torch.long`` in ``data``; an observed site whose data argument was not named is
        matched to it here.

        Raises
        ------
        DataError
            When the story cannot run on the data (a shape that does not fit its
            plates), or an observed site's data has another shape than its distribution.
        StoryError
            When the story has no sample sites, or never observes a declared site.

        Returns
        -------
        pyro.poutine.Trace
            The run, from which the story's facts are read.
        """
        try:
            trace = self._trace_with_index_covariates(data)
        except (ValueError, RuntimeError, IndexError) as error:
            self._blame_invalid_parameter(error, data)
            self._blame_mixed_dtypes(error)
            shapes = {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise DataError(f"story {self.name!r} cannot run on this data: {reason}. The "
                            f"data's shapes: {shapes}") from error
        self._probe_prior_draws(data)
        sites = sample_sites(trace)
        if not sites:
            raise StoryError(f"story {self.name!r} has no pyro.sample sites: a story draws "
                             "its latent values and observations with pyro.sample")
        for name in self.observed:
            site = sites.get(name)
            if site is None or not site["is_observed"]:
                argument = self.observed_arguments.get(name) or "..."
                raise StoryError(
                    f"story {self.name!r} declares {name!r} observed but never calls "
                    f"pyro.sample({name!r}, ..., obs={argument})")
            if self.observed_arguments.get(name) is None:
                self.observed_arguments[name] = next(
                    (k for k, v in data.items() if v is site["value"]), None)
            expected = tuple(site["fn"].batch_shape + site["fn"].event_shape)
            got = tuple(site["value"].shape)
            if got != expected:
                plates = [f.name for f in site["cond_indep_stack"]]
                raise DataError(
                    f"story {self.name!r}: data for observed site {name!r} has shape {got}, "
                    f"but its distribution inside plates {plates} gives shape {expected}")
            self._check_support(name, site)
        return trace

    #: Prior draws at which :meth:`check_data` runs the story besides its first run
    PROBE_DRAWS = 7

    def _probe_prior_draws(self, data: Mapping[str, Any]) -> None:
        """Run the story at a few more prior draws, to name an invalid parameter.

        Some prior draws can give a distribution an invalid parameter (a Normal prior on a
        scale: half its draws are negative), and one run can miss it (seed 0 drew a
        positive scale); with :data:`PROBE_DRAWS` more, a parameter invalid on half the
        prior is missed once in 256 stories. Errors that are not an invalid parameter
        are left to the methods, which reject such points.
        """
        with torch.no_grad(), run_dtype(self.dtype):
            for seed in range(1, self.PROBE_DRAWS + 1):
                try:
                    trace_model(self, data, seed)
                except (ValueError, RuntimeError) as error:
                    self._blame_invalid_parameter(error, data)

    def _blame_mixed_dtypes(self, error: Exception) -> None:
        """A story that mixes float32 and float64 tensors: a StoryError naming both.

        The data are converted to the story's dtype, so the other dtype comes from a
        tensor the story made or carries (:mod:`ppl_notes._constants`): the line of the
        story where they met is named, with the fix.
        """
        message = str(error)
        if not _MIXED_DTYPES.search(message):
            return
        code = getattr(self.fn.forward if isinstance(self.fn, torch.nn.Module) else self.fn,
                       "__code__", None)
        frames = [f for f in traceback.extract_tb(error.__traceback__)
                  if code is not None and f.filename == code.co_filename]
        where = (f" at line {frames[-1].lineno} (`{frames[-1].line}`)"
                 if frames and frames[-1].line else "")
        raise StoryError(
            f"story {self.name!r} mixes float32 and float64 tensors{where}: "
            f"{message.strip().splitlines()[0]}. It runs in "
            f"{str(self.dtype).removeprefix('torch.')} ({self.dtype_reason}), and its data "
            "are converted to that; a tensor the story made or closes over keeps the dtype "
            "it was made in. Make the story's constants in one dtype, or pass "
            "@ppl_notes.model(dtype=...)") from error

    def _blame_invalid_parameter(self, error: Exception, data: Mapping[str, Any]) -> None:
        """Name who gave a distribution an invalid parameter (NaN, a negative scale).

        A DataError when a covariate of the parameter's shape breaks the parameter's
        constraint itself (``sigma`` of zeros), else a StoryError naming the
        distribution, the parameter and the line of the story (a prior or transform that
        leaves the parameter's domain).
        """
        what = invalid_parameter(error, self.fn)
        if what is None:
            return
        parameter, distribution, _ = _INVALID_PARAMETER.search(str(error)).groups()
        shape = re.search(r"Tensor of shape \(([\d, ]*)\)", str(error))
        shape = tuple(int(n) for n in shape.group(1).split(",") if n.strip()) if shape else None
        constraint = getattr(getattr(pyro.distributions, distribution, None), "arg_constraints",
                             {}).get(parameter)
        observed = set(self.observed_arguments.values())
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
                    f"story {self.name!r}: data {name!r} give {distribution} an invalid "
                    f"{parameter} ({what.split(' (', 1)[1]}; check the data") from error
        raise StoryError(
            f"story {self.name!r}: {what}, when run with draws from its priors. A "
            "prior that lets a parameter leave its domain (a Normal prior on a scale), or a "
            "transform that is NaN for some values (log or sqrt of a negative), makes the "
            "log density undefined: give the parameter a prior on its domain (HalfNormal, "
            "LogNormal, Beta) or constrain the transform (or, where data enter the "
            "parameter, check those data)") from error

    def _check_support(self, name: str, site: dict) -> None:
        """Name the first observed element outside its distribution's support.

        Pyro only checks the support when a log density is taken, during inference,
        where the failure reads as a bad step size. Masked elements are checked too, as
        Pyro validates every element before masking.
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
        argument = self.observed_arguments.get(name)
        label = f" (argument {argument!r})" if argument and argument != name else ""
        base = getattr(fn, "base_dist", fn)
        raise DataError(
            f"story {self.name!r}: observed site {name!r}{label} has {shown} at element "
            f"{where}, outside the support of {type(base).__name__}: {support} "
            f"({int(outside.sum())} of {outside.numel()} elements are outside). Check the "
            "data, or the distribution the story gives it"
            + ("; masked elements too must lie in the support (fill them with a valid value)"
               if site.get("mask") is not None or hasattr(fn, "_mask") else ""))

    def _trace_with_index_covariates(self, data: dict[str, Any]):
        """One run of the story on ``data``; integer covariates used as indices become long.

        Data arrive as floating-point tensors; a story that indexes with a covariate
        (``locs[group]``, as Pyro users write) needs it as integers. On torch's "used as
        indices" error the integer-valued covariates are made ``torch.long`` and the run
        is tried again.
        """
        with torch.no_grad(), run_dtype(self.dtype):
            try:
                return trace_model(self, data, 0)
            except IndexError as error:
                observed = set(self.observed_arguments.values())
                integer = {k: v.long() for k, v in data.items()
                           if k not in observed and torch.is_tensor(v) and v.is_floating_point()
                           and bool((v == v.round()).all())}
                if "used as indices" not in str(error) or not integer:
                    raise
                trace = trace_model(self, {**data, **integer}, 0)
        logger.info("story %r: integer covariates %s used as indices, now torch.long",
                    self.name, sorted(integer))
        data.update(integer)
        return trace

    def _to_tensor(self, key: str, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().numpy()
        else:
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as error:
                raise DataError(
                    f"story {self.name!r}: data for {key!r} is not a rectangular array of "
                    f"numbers ({error})") from error
        numeric = np.issubdtype(array.dtype, np.number) or array.dtype == bool
        if array.dtype == object or not numeric:
            raise DataError(
                f"story {self.name!r}: data for {key!r} must be numeric, got dtype "
                f"{array.dtype}"
            )
        if array.size == 0:
            raise DataError(f"story {self.name!r}: data for {key!r} is empty")
        bad = ~np.isfinite(array.astype(float))
        if bad.any():
            where = np.argwhere(bad)[:5].tolist()
            raise DataError(
                f"story {self.name!r}: data for {key!r} has {int(bad.sum())} NaN or "
                f"infinite value(s), first at index {where}; remove or impute them"
            )
        if array.dtype == bool and key not in self.observed_arguments.values():
            return torch.as_tensor(array)  # a mask (poutine.mask takes booleans)
        return torch.as_tensor(array.astype(float), dtype=self.dtype)

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
        return _reduce_by_reference(self)


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


#: torch's words for two floating dtypes meeting in one operation
_MIXED_DTYPES = re.compile(r"(same dtype|dtype.*(Double|Float).*(Double|Float)|expected scalar "
                           r"type (Double|Float) but found (Double|Float)|double != float|"
                           r"float != double)", re.IGNORECASE)


def _argument_holding(value, data: Mapping[str, Any]) -> str | None:
    """The data argument that ``value`` is: the same tensor, or the same numbers."""
    if not torch.is_tensor(value):
        return None
    for key, candidate in data.items():
        if candidate is value:
            return key
    for key, candidate in data.items():
        if (torch.is_tensor(candidate) and candidate.numel() == value.numel()
                and torch.equal(candidate.reshape(-1).to(value.dtype), value.reshape(-1))):
            return key
    return None


def story_signature(fn: Callable) -> inspect.Signature:
    """The arguments a story takes: a ``PyroModule``'s are those of its ``forward``."""
    if isinstance(fn, torch.nn.Module):
        return inspect.signature(fn.forward)
    return inspect.signature(fn)


def callable_name(fn: Callable) -> str:
    """A story's or guide's name from its callable.

    A function's name (``lambda`` for a lambda), the wrapped function's for a
    ``functools.partial``, and the class's for a ``PyroModule`` or any other callable
    object (``BayesianRegression``), as Pyro's tutorials write them.
    """
    if isinstance(fn, functools.partial):
        return callable_name(fn.func)
    name = None if isinstance(fn, torch.nn.Module) else getattr(fn, "__name__", None)
    if isinstance(name, str):
        return "lambda" if name == "<lambda>" else name
    return type(fn).__name__


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


def _reduce_by_reference(obj):
    """Pickle a module-level story or guide by its import path, any other by value.

    Worker processes then import it rather than receive a copy. A story defined in
    ``__main__`` (a script, a notebook) or in no importable module travels by value:
    cloudpickle copies its function.
    """
    module = inspect.getmodule(obj.fn)
    importable = module is not None and module.__name__ != "__main__" and getattr(
        module, "__spec__", None) is not None
    if importable and getattr(module, obj.name, None) is obj:
        return (_import_attribute, (module.__name__, obj.name))
    return object.__reduce__(obj)


def _import_attribute(module_name: str, attribute: str):
    import importlib

    return getattr(importlib.import_module(module_name), attribute)
