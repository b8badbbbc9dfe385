r"""Regression stories where a regulariser is a prior (notes §1.b).

Linear regression with known noise :math:`\sigma` and a prior of scale :math:`\tau` on
the weights: minimising the structural risk

.. math:: \sum_i (y_i - x_i^\top w)^2 + \lambda\,\Omega(w)

is MAP estimation. A Normal prior gives the ridge penalty
:math:`\Omega = \lVert w\rVert_2^2` with :math:`\lambda = \sigma^2/\tau^2`; a Laplace
prior gives the lasso, :math:`\Omega = \lVert w\rVert_1` with
:math:`\lambda = 2\sigma^2/\tau`; no prior (MLE) is ordinary least squares. Logistic
regression is the same story with a Bernoulli likelihood.

Default data ship with scikit-learn (no download): the diabetes study (Efron et al.
2004; 442 patients, 10 baseline variables, disease progression after one year) for the
linear story, and the Wisconsin breast cancer data (Street, Wolberg & Mangasarian 1993;
569 tumours, 30 features, malignant or benign) for the logistic one. Features are
standardised; the diabetes response is standardised too.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ppl_notes.errors import OptionError
from ppl_notes.story import model as _model

__all__ = ["linear", "logistic", "load_diabetes", "load_breast_cancer"]

_PRIORS = {"normal": dist.Normal, "laplace": dist.Laplace}


def _standardise(array: np.ndarray) -> np.ndarray:
    return (array - array.mean(0)) / array.std(0)


def load_diabetes() -> dict[str, np.ndarray]:
    """scikit-learn's diabetes data: ``x`` (442, 10) and ``y`` (442,), standardised."""
    from sklearn.datasets import load_diabetes as load

    bunch = load()
    return {"x": _standardise(bunch.data), "y": _standardise(bunch.target)}


def load_breast_cancer() -> dict[str, np.ndarray]:
    """scikit-learn's breast cancer data: ``x`` (569, 30) standardised, ``y`` 1 = malignant."""
    from sklearn.datasets import load_breast_cancer as load

    bunch = load()
    return {"x": _standardise(bunch.data), "y": (bunch.target == 0).astype(float)}


def _feature_coords(data):
    x = data.get("x")
    coords = {}
    if x is not None:
        coords["features"] = np.arange(x.shape[-1])
        coords["observations"] = np.arange(x.shape[-2])
    return coords


def _weights(x, prior: str, weight_scale: float):
    if prior not in _PRIORS:

        raise OptionError(f"prior must be one of {sorted(_PRIORS)}, got {prior!r}")
    zero, scale = torch.zeros((), dtype=x.dtype), torch.as_tensor(weight_scale, dtype=x.dtype)
    with pyro.plate("features", x.shape[-1]):
        return pyro.sample("weights", _PRIORS[prior](zero, scale))


def _linear_predictor(x, weights):
    # (..., 1, D) * (N, D) summed over D: broadcasts over leading draw/chain dims
    return (x * weights.unsqueeze(-2)).sum(-1)


@_model(observed="y", data=load_diabetes,
        coords=_feature_coords, name="linear_regression")
def linear(x, y=None, prior="normal", weight_scale=1.0, noise_scale=1.0):
    """y_i ~ Normal(x_i . w, noise_scale), w_j ~ prior(0, weight_scale) ('normal' or 'laplace')."""
    weights = _weights(x, prior, weight_scale)
    with pyro.plate("observations", x.shape[-2]):
        pyro.sample("y", dist.Normal(_linear_predictor(x, weights), noise_scale), obs=y)


@_model(observed="y", data=load_breast_cancer,
        coords=_feature_coords, name="logistic_regression")
def logistic(x, y=None, prior="normal", weight_scale=1.0, bias_scale=10.0):
    """y_i ~ Bernoulli(logits = b + x_i . w), w_j ~ prior(0, weight_scale).

    The bias b ~ Normal(0, bias_scale); y = 1 for a malignant tumour in the default data.
    """
    bias = pyro.sample("bias", dist.Normal(torch.zeros((), dtype=x.dtype), bias_scale))
    weights = _weights(x, prior, weight_scale)
    with pyro.plate("observations", x.shape[-2]):
        logits = bias.unsqueeze(-1) + _linear_predictor(x, weights)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)
