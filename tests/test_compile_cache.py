"""Inductor's FX graph cache serves the graphs ppl_notes captures (evaluation.compile)."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes.evaluation.compile import capture, compiler_available

pytestmark = pytest.mark.skipif(not compiler_available(), reason="inductor needs a C++ compiler")


def _value_and_grad(data):
    def log_density(x):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = dist.Normal(x[:, :1], torch.exp(x[:, 1:])).log_prob(data).sum(-1)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad.detach()
    return log_density


def test_a_second_capture_is_served_from_the_cache_and_binds_its_own_data():
    from torch._dynamo.utils import counters

    pyro.clear_param_store()
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    first_data = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    second_data = first_data * 3.0 + 1.0  # same shapes, other values
    capture(_value_and_grad(first_data), x.clone())
    hits = counters["inductor"]["fxgraph_cache_hit"]
    compiled = capture(_value_and_grad(second_data), x.clone())
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1
    value, grad = compiled(x)
    expected, expected_grad = _value_and_grad(second_data)(x)
    np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=1e-12)
