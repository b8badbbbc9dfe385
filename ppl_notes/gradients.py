r"""The two ELBO gradient estimators of notes §2.g, and their variance.

Score function (REINFORCE; Williams 1992, Ranganath et al. 2014):

.. math:: \nabla_\lambda \mathrm{ELBO} = \mathbb E_{q(z;\lambda)}\big[\nabla_\lambda
          \log q(z;\lambda)\,(\log p(x,z) - \log q(z;\lambda))\big],

which needs only :math:`\log q` to be differentiable in :math:`\lambda`. Reparameterisation
(Kingma & Welling 2014): write :math:`z = g(\epsilon;\lambda)`,
:math:`\epsilon\sim q(\epsilon)`, then

.. math:: \nabla_\lambda \mathrm{ELBO} = \mathbb E_{q(\epsilon)}\big[\nabla_\lambda
          (\log p(x, g(\epsilon;\lambda)) - \log q(g(\epsilon;\lambda);\lambda))\big].

Both are unbiased; the second uses the model's gradient and usually has far smaller
variance (:func:`gradient_variance` measures it). Pyro picks per site: reparameterised
where the distribution has ``rsample``; :func:`force_estimator` overrides that choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.distributions import TorchDistribution
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppl_notes.errors import OptionError, StoryError
from ppl_notes.vi.compiled_svi import trace_elbo_loss

__all__ = ["ESTIMATORS", "force_estimator", "gradient_variance"]

#: ``auto``: Pyro's choice per site; ``reparam``: every site reparameterised (an error
#: where a distribution has no rsample); ``score``: every site by the score function.
ESTIMATORS = ("auto", "reparam", "score")


class _WithoutRsample(TorchDistribution):
    """``base`` drawn with ``sample`` only: no gradient flows through its draws."""

    has_rsample = False

    def __init__(self, base):
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        """The base distribution's support."""
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        """Expand the base distribution (as Pyro plates do)."""
        return _WithoutRsample(self.base.expand(batch_shape))

    def sample(self, sample_shape=()):
        """A draw of the base distribution, detached."""
        return self.base.sample(sample_shape)

    def log_prob(self, value):
        """The base distribution's log density."""
        return self.base.log_prob(value)


class _ScoreFunction(Messenger):
    """Make every latent sample site draw without a reparameterisation path."""

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):  # a plate's index, not a latent variable
            return
        if not msg["is_observed"] and msg["fn"].has_rsample:
            msg["fn"] = _WithoutRsample(msg["fn"])


class _RequireReparam(Messenger):
    """Fail, naming the site, where a latent site cannot be reparameterised."""

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            return
        if not msg["is_observed"] and not msg["fn"].has_rsample:
            raise StoryError(
                f"estimator='reparam': guide site {msg['name']!r} "
                f"({type(msg['fn']).__name__}) has no reparameterised sampler; use "
                "estimator='score' or 'auto' (score function for that site only)"
            )


def force_estimator(guide: Callable, estimator: str) -> Callable:
    """``guide`` with every latent site using the named gradient estimator.

    Parameters
    ----------
    guide : callable
        A Pyro guide.
    estimator : {"auto", "reparam", "score"}
        ``auto`` returns the guide unchanged.
    """
    if estimator not in ESTIMATORS:
        raise OptionError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    if estimator == "auto":
        return guide
    handler = _ScoreFunction() if estimator == "score" else _RequireReparam()

    def forced(*args, **kwargs):
        with handler:
            return guide(*args, **kwargs)

    forced.__name__ = getattr(guide, "__name__", getattr(guide, "name", "guide"))
    forced.__doc__ = getattr(guide, "__doc__", None)
    return forced


def gradient_variance(model, guide, data: Mapping | None = None, *, estimator: str = "score",
                      num_samples: int = 1000, params: Mapping[str, Any] | None = None,
                      seed: int = 0) -> pd.DataFrame:
    r"""Mean and variance of single-sample ELBO gradient estimates, per parameter element.

    Draws ``num_samples`` independent one-sample estimates of
    :math:`\nabla_\lambda\mathrm{ELBO}` at the guide's parameters and summarises each
    element of each (unconstrained) parameter. The guide's parameters are its initial
    values unless ``params`` gives constrained values for some of them. The global
    param store is left untouched.

    Parameters
    ----------
    model : Model
        The story.
    guide : callable
        Its guide.
    data : mapping, optional
        The story's data (default data when omitted).
    estimator : {"score", "reparam", "auto"}
        See :func:`force_estimator`.
    num_samples : int
        Number of one-sample gradient estimates.
    params : mapping, optional
        ``{param name: constrained value}`` to evaluate at.
    seed : int
        Seeds the draws.

    Returns
    -------
    pandas.DataFrame
        Columns ``parameter``, ``element``, ``mean``, ``variance``; one row per element.

    Examples
    --------
    >>> from ppl_notes.gradients import gradient_variance
    >>> from ppl_notes.models.conjugate import normal_mean
    >>> from ppl_notes.guides.conjugate import normal_mean_guide
    >>> table = gradient_variance(normal_mean, normal_mean_guide, num_samples=200)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise OptionError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    prepared = model.prepare_data(data)
    forced = force_estimator(guide, estimator)
    elbo = Trace_ELBO()
    with pyro.get_param_store().scope():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            pyro.poutine.trace(forced).get_trace(**prepared)  # creates the parameters
        store = pyro.get_param_store()
        for name, value in (params or {}).items():
            if name not in store:
                raise OptionError(f"params: the guide has no parameter {name!r}; it has "
                                  f"{sorted(store.keys())}")
            store[name] = torch.as_tensor(value, dtype=torch.float64)
        names = sorted(store.keys())
        unconstrained = [store._params[n] for n in names]
        samples = []
        for _ in range(num_samples):
            _, surrogate = trace_elbo_loss(elbo, model, forced, prepared)
            grads = torch.autograd.grad(-surrogate, unconstrained, allow_unused=True)
            samples.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, unconstrained, strict=True)]).detach().numpy())
    samples = np.stack(samples)
    rows, column = [], 0
    for name, tensor in zip(names, unconstrained, strict=True):
        for element in range(tensor.numel()):
            rows.append({"parameter": name, "element": element,
                         "mean": samples[:, column].mean(),
                         "variance": samples[:, column].var(ddof=1)})
            column += 1
    return pd.DataFrame(rows)
