"""The tape against eager torch on random graphs of the operations it supports (issue 29).

Hypothesis builds a graph: from the point ``x`` (a batch of rows), each node applies an
operation drawn from the menus below to one or two earlier nodes; the last node, summed
per row, is the potential. The tape records the graph's value and gradient at one point
and must give eager torch's value and gradient, within 1e-9 of their scale, at others:
the C interpreter computes what the recorded torch operations compute, and only the
order of a reduction's additions may differ.

Every operation keeps its inputs in its domain by construction (``log(x * x + 1)``), so a
graph never leaves the reals and no example is thrown away.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_notes.evaluation.potential import _eager_value_and_grad, _value_and_grad_of
from ppl_notes.native import tape as _tape

pytestmark = pytest.mark.skipif(_tape.library() is None, reason="no C compiler here")

BATCH, DIM = 3, 4
#: The issue's bound: at least 500 generated graphs.
GRAPHS = 500
_GENERATOR = torch.Generator().manual_seed(29)
#: Constants a graph may use, made once (the tape keeps constants as data)
_MATRIX = torch.randn(DIM, DIM, generator=_GENERATOR, dtype=torch.float64) / 2
_INDEX = torch.tensor([3, 0, 0, 2])

#: A permutation: LU factorisation of a matrix near it must pivot
_PERMUTATION = torch.eye(DIM, dtype=torch.float64)[[2, 0, 3, 1]]


def _pivoted(a: torch.Tensor) -> torch.Tensor:
    """A matrix per row, each far from singular, whose factorisation swaps rows."""
    return 2 * _PERMUTATION + 0.3 * torch.tanh(a)[:, :, None] * _MATRIX


UNARY = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sin": torch.sin, "cos": torch.cos,
    "atan": torch.atan, "softplus": torch.nn.functional.softplus,
    "logsigmoid": torch.nn.functional.logsigmoid, "erf": torch.erf, "abs": torch.abs,
    "neg": torch.neg, "exp_tanh": lambda a: torch.exp(torch.tanh(a)),
    "expm1_tanh": lambda a: torch.expm1(torch.tanh(a)),
    "log_square": lambda a: torch.log(a * a + 1), "log1p_abs": lambda a: torch.log1p(a.abs()),
    "sqrt_square": lambda a: torch.sqrt(a * a + 1), "rsqrt": lambda a: torch.rsqrt(a * a + 1),
    "reciprocal": lambda a: torch.reciprocal(a * a + 1),
    "lgamma": lambda a: torch.lgamma(a.abs() + 0.5),
    "digamma": lambda a: torch.digamma(a.abs() + 0.5), "square": lambda a: a**2,
    "pow": lambda a: (a * a + 1) ** 0.7, "clamp": lambda a: a.clamp(-0.5, 0.7) * a,
    # data movement and scans along the row (indices fixed: they do not depend on x)
    "cumsum": lambda a: a.cumsum(-1), "flip": lambda a: a.flip(-1),
    "gather": lambda a: a[:, _INDEX], "roll": lambda a: torch.cat([a[:, 1:], a[:, :1]], -1),
    "matmul": lambda a: a @ _MATRIX, "row_sum": lambda a: a.sum(-1, keepdim=True) + 0 * a,
    "row_mean": lambda a: a.mean(-1, keepdim=True).expand_as(a),
    "logsumexp": lambda a: torch.logsumexp(a, -1, keepdim=True) - a,
    "softmax_by_hand": lambda a: (a - a.detach().amax(-1, keepdim=True)).exp()
    / (a - a.detach().amax(-1, keepdim=True)).exp().sum(-1, keepdim=True),
    "bmm_outer": lambda a: (a[:, :, None] @ a[:, None, :]).sum(-1) / DIM,
    # a permutation found from the point at every run, and its backward scatter
    "sort": lambda a: torch.sort(a, -1).values,
    "sort_descending": lambda a: torch.sort(a, -1, descending=True).values,
    "topk": lambda a: torch.cat([torch.topk(a, 2).values, a[:, 2:]], -1),
    "argsort_gather": lambda a: torch.gather(torch.sin(a), 1, torch.argsort(a, -1)),
    # LU with pivots found from the point (matrices kept well away from singular)
    "solve": lambda a: torch.linalg.solve(_pivoted(a), a),
    "slogdet": lambda a: torch.linalg.slogdet(_pivoted(a)).logabsdet[:, None] * a,
    "det": lambda a: torch.linalg.det(_pivoted(a))[:, None] + a,
    "inverse": lambda a: (torch.linalg.inv(_pivoted(a)) @ a[:, :, None]).squeeze(-1),
}
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul,
    "div": lambda a, b: a / (b * b + 1), "maximum": torch.maximum, "minimum": torch.minimum,
    "where": lambda a, b: torch.where(a > b, a, 2 * b), "logaddexp": torch.logaddexp,
    "pow": lambda a, b: (a * a + 1) ** torch.tanh(b),
    "xlogy": lambda a, b: torch.xlogy(a * a, b * b + 1),
}


@st.composite
def graphs(draw):
    """``[(operation, inputs)]``: node i reads nodes before it; node 0 is the point."""
    nodes = []
    for i in range(draw(st.integers(1, 7))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(UNARY)))
            nodes.append((name, (draw(st.integers(0, i)),)))
        else:
            name = draw(st.sampled_from(sorted(BINARY)))
            nodes.append((name, (draw(st.integers(0, i)), draw(st.integers(0, i)))))
    return nodes


def _function(graph):
    def function(x):
        values = [x]
        for name, inputs in graph:
            operation = UNARY.get(name) if len(inputs) == 1 else BINARY.get(name)
            values.append(operation(*(values[i] for i in inputs)))
        return values[-1].sum(-1) + 0.1 * (values[0] ** 2).sum(-1)
    return function


def _assert_close(got, expected, what, graph):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * scale,
                               err_msg=f"{what} of {graph}")


@settings(max_examples=GRAPHS, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(graph=graphs(), seed=st.integers(0, 2**16))
def test_random_graphs_run_on_the_tape_as_in_torch(graph, seed):
    rng = np.random.default_rng(seed)
    function = _function(graph)
    example = torch.from_numpy(rng.normal(size=(BATCH, DIM)))
    tape = _tape.Tape(_value_and_grad_of(function), example)
    for _ in range(2):
        x = rng.normal(size=(BATCH, DIM))
        value, grad = tape(torch.from_numpy(x))
        expected_value, expected_grad = _eager_value_and_grad(function, x)
        _assert_close(value.numpy(), expected_value, "value", graph)
        _assert_close(grad.numpy(), expected_grad, "gradient", graph)
