r"""The notes' diagnosis example (§1.b): a missed disease costs more than a false alarm.

Story: each patient has the disease with probability ``prevalence``; the test is
positive with probability ``sensitivity`` if they have it and ``1 - specificity`` if not.
By Bayes' rule

.. math:: P(\text{disease} \mid +) = \frac{s\,\pi}{s\,\pi + (1 - c)(1 - \pi)}

(:math:`\pi` prevalence, :math:`s` sensitivity, :math:`c` specificity). For a rare
disease this stays small even after a positive test, so ``argmax p(y|x)`` says
"healthy" -- but with the loss table :data:`LOSS` (missing a sick patient costs 100
times a needless treatment) the Bayes decision (:func:`ppl_notes.decide`) is to treat.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

from ppl_notes.story import model as _model

__all__ = ["diagnosis", "posterior_probability", "LOSS"]

#: Loss of each action (rows) when the patient is healthy (0) or sick (1) (columns).
LOSS = pd.DataFrame({0: [0.0, 1.0], 1: [100.0, 0.0]}, index=["send home", "treat"])
LOSS.columns.name = "disease"


def _one_positive_test():
    return {"test": np.array([1.0])}


@_model(observed="test", data=_one_positive_test, name="diagnosis")
def diagnosis(test=None, num_patients=None, prevalence=0.01, sensitivity=0.9,
              specificity=0.95):
    """Disease ~ Bernoulli(prevalence); test ~ Bernoulli(sens if disease else 1 - spec)."""
    dtype = test.dtype if test is not None else torch.float64
    num_patients = test.shape[-1] if test is not None else (num_patients or 1)
    with pyro.plate("patients", num_patients):
        disease = pyro.sample("disease", dist.Bernoulli(torch.tensor(prevalence, dtype=dtype)))
        positive = torch.where(disease > 0, torch.tensor(sensitivity, dtype=dtype),
                               torch.tensor(1 - specificity, dtype=dtype))
        pyro.sample("test", dist.Bernoulli(positive), obs=test)


def posterior_probability(test_positive, prevalence=0.01, sensitivity=0.9,
                          specificity=0.95) -> np.ndarray:
    """P(disease | test result) by Bayes' rule, for each result (1 positive, 0 negative)."""
    test_positive = np.asarray(test_positive, dtype=float)
    sick = np.where(test_positive > 0, sensitivity, 1 - sensitivity) * prevalence
    healthy = np.where(test_positive > 0, 1 - specificity, specificity) * (1 - prevalence)
    return sick / (sick + healthy)
