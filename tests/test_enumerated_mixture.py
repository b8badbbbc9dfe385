"""An enumerated mixture (issue 42 part 3): its potential is the marginal's, exactly.

The truth is computed without ppl_notes: Pyro's ``TraceEinsumEvaluator`` on an eager
trace of the story with ``k`` enumerated, and ``MixtureSameFamily``'s closed-form
log density, at random unconstrained points. Both are float64 sums of 1000 terms, so
1e-10 relative is rounding, not Monte Carlo.
"""

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.mcmc.util import TraceEinsumEvaluator
from torch.distributions import biject_to

from ppl_notes.evaluation.potential import BatchedPotential
from tests.corpus import low_dim_gauss_mix as mix


def _eager_log_joint(story, data, point):
    """log p(y, theta) + log|J| at an unconstrained point, by Pyro's own contraction."""
    supports = {"mu": (constraints.ordered_vector, (2,)), "sigma": (constraints.positive, (2,)),
                "theta": (constraints.unit_interval, ())}
    values, log_jacobian, start = {}, 0.0, 0
    for name, (support, shape) in supports.items():
        size = int(np.prod(shape))
        unconstrained = torch.tensor(point[start:start + size], dtype=torch.float64)
        unconstrained = unconstrained.reshape(shape)
        transform = biject_to(support)
        values[name] = transform(unconstrained)
        log_jacobian += float(transform.log_abs_det_jacobian(unconstrained, values[name]).sum())
        start += size
    conditioned = poutine.condition(story, data=values)
    enumerated = poutine.enum(conditioned, first_available_dim=-2)
    trace = poutine.trace(enumerated).get_trace(**data)
    trace = pyro.poutine.util.prune_subsample_sites(trace)
    trace.compute_log_prob()
    return float(TraceEinsumEvaluator(trace, True, 1).log_prob(trace)) + log_jacobian


def test_the_enumerated_mixture_is_the_marginal_to_rounding():
    data = mix.simulated(1000, seed=3)
    points = np.random.default_rng(0).normal(size=(4, 5)) * 0.5
    enumerated = BatchedPotential(mix.with_assignment, data, 4, compiler="tape")
    marginal = BatchedPotential(mix.marginal, data, 4, compiler="tape")
    value, grad = enumerated(points)
    marginal_value, marginal_grad = marginal(points)
    for i, point in enumerate(points):
        truth = -_eager_log_joint(mix.with_assignment, data, point)
        assert abs(value[i] - truth) <= 1e-10 * abs(truth)
    np.testing.assert_allclose(value, marginal_value, rtol=1e-10)
    np.testing.assert_allclose(grad, marginal_grad, rtol=1e-8, atol=1e-8)
