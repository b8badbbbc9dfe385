"""The potential tape: recorded aten operations run by the C interpreter.

The truth is eager PyTorch: each computation is run by autograd and by its tape at
points other than the one recorded, and the two must agree to rounding (float64 ops in
a different order and another libm: 1e-9 relative).
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import infer, model
from ppl_notes.evaluation.potential import (
    BatchedPotential,
    _eager_value_and_grad,
    _value_and_grad_of,
)
from ppl_notes.native import tape as _tape

pytestmark = pytest.mark.skipif(_tape.library() is None, reason="no C compiler here")

BATCH, DIM = 3, 4


_value_and_grad = _value_and_grad_of  # batch -> (values, gradients), by autograd


def assert_tape_matches(function, dim=DIM, scale=1.0, shift=0.0, seed=0):
    """Record ``function`` (batch -> per-row value) at one point; compare at others."""
    rng = np.random.default_rng(seed)
    example = torch.from_numpy(rng.normal(shift, scale, (BATCH, dim)))
    with pyro.validation_enabled(False):  # as the potential records: checks read values
        tape = _tape.Tape(_value_and_grad(function), example)
    for _ in range(4):
        x = rng.normal(shift, scale, (BATCH, dim))
        value, grad = tape(torch.from_numpy(x))
        expected_value, expected_grad = _eager_value_and_grad(function, x)
        np.testing.assert_allclose(value.numpy(), expected_value, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-9, atol=1e-12)
    return tape


UNARY = {
    "exp": torch.exp, "log": lambda x: torch.log(x.abs() + 0.5),
    "log1p": lambda x: torch.log1p(x.abs()), "expm1": torch.expm1,
    "sqrt": lambda x: (x * x + 1).sqrt(), "rsqrt": lambda x: (x * x + 1).rsqrt(),
    "abs": torch.abs, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "lgamma": lambda x: torch.lgamma(x.abs() + 0.3),
    "digamma": lambda x: torch.digamma(x.abs() + 0.3),
    "erf": torch.erf, "erfc": torch.erfc, "reciprocal": lambda x: (x * x + 1).reciprocal(),
    "sin": torch.sin, "cos": torch.cos, "atan": torch.atan,
    "softplus": torch.nn.functional.softplus,
    "softplus_beta": lambda x: torch.nn.functional.softplus(x, beta=2.0, threshold=1.0),
    "logsigmoid": torch.nn.functional.logsigmoid,
    "clamp": lambda x: x.clamp(-0.5, 0.7) * x, "clamp_min": lambda x: x.clamp(min=0.1) * x,
    "square": lambda x: x**2, "cube": lambda x: x**3, "pow_half": lambda x: (x * x + 1) ** 0.5,
    "pow_general": lambda x: (x * x + 1) ** 1.7, "pow_tensor": lambda x: (x * x + 1) ** x,
    "rpow": lambda x: 2.0**x, "neg": lambda x: -x, "rsub": lambda x: 1.0 - 3.0 * x,
    "polygamma1": lambda x: torch.polygamma(1, x.abs() + 0.5),
    "logaddexp": lambda x: torch.logaddexp(x, 2 * x),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_elementwise(name):
    function = UNARY[name]
    assert_tape_matches(lambda x: function(x).sum(-1))


def test_trigamma_the_gradient_of_digamma_is_exact():
    """Torch's own trigamma is 4e-10 off scipy's near 1; the tape's is not."""
    import scipy.special

    tape = _tape.Tape(_value_and_grad(lambda x: torch.digamma(x).sum(-1)),
                      torch.full((BATCH, DIM), 2.0, dtype=torch.float64))
    x = np.random.default_rng(0).uniform(0.2, 12.0, (BATCH, DIM))
    _, grad = tape(torch.from_numpy(x))
    np.testing.assert_allclose(grad.numpy(), scipy.special.polygamma(1, x), rtol=1e-13)


def test_comparisons_selections_and_type_promotion():
    data32 = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float32)
    counts = torch.tensor([0, 3, 1, 0])

    def function(x):
        chosen = torch.where(x > 0, x * 2, torch.exp(x))
        masked = x.masked_fill(x < -0.5, 0.0)
        extremes = torch.maximum(x, data32) + torch.minimum(x, -x)
        return (chosen + masked + extremes + torch.xlogy(counts, x.exp()) + x * data32).sum(-1)

    assert_tape_matches(function)


def test_reductions_keep_and_drop_dimensions():
    def function(x):
        grid = x.reshape(BATCH, 2, 2)
        return (grid.sum(1).prod(-1) + grid.mean((1, 2)) + grid.amax(-1).sum(-1)
                + torch.logsumexp(grid, dim=(1, 2)) + grid.sum(-1, keepdim=True).squeeze(-1)[:, 0])

    assert_tape_matches(function)


def test_max_runs_with_its_gradient_scattered_at_the_argmax_of_each_run():
    def stabilised(x):  # the forward algorithm's log-sum-exp, as users write it
        top = x.max(-1, keepdim=True).values.detach()
        return (x - top).exp().sum(-1).log() + top[:, 0] + x.amin(-1)

    assert_tape_matches(stabilised)
    # max's backward scatters the gradient at its argmax, found at every run
    assert_tape_matches(lambda x: x.max(-1).values * 2 + x.reshape(-1, 2, 2).max(1).values[:, 0])


def test_scans():
    def function(x):
        # the gradients of cumprod and logcumsumexp gather at indices that depend on the
        # point (cumprod's first zero), read at every run
        return (x.cumsum(-1) ** 2).sum(-1) + x.exp().cumprod(-1)[:, -1] + \
            torch.logcumsumexp(x, -1)[:, -1] + x.cumprod(-1)[:, -1]

    assert_tape_matches(function)


def test_matrix_products_user_style():
    design = torch.randn(7, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    square = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def function(x):
        linear = x @ design.T  # (batch, 7)
        batched = torch.bmm(x[:, None, :], x[:, :, None]).reshape(-1)
        vector = torch.mv(square, x[0]).sum() + torch.dot(x[0], x[1])
        return (linear**2).sum(-1) + batched + vector + (x @ square @ x.T).diagonal()

    assert_tape_matches(function)


def test_cholesky_and_triangular_solves():
    def function(x):
        # a positive definite matrix per row of the batch, then MVN log densities
        factor = torch.tril(x[:, :, None] * x[:, None, :] * 0.1) + 2 * torch.eye(DIM)
        covariance = factor @ factor.transpose(-1, -2)
        value = torch.ones(DIM)
        log_prob = dist.MultivariateNormal(x, covariance_matrix=covariance).log_prob(value)
        lower = torch.linalg.cholesky(covariance)
        upper = torch.linalg.cholesky(covariance, upper=True)
        right = torch.linalg.solve_triangular(lower, covariance, upper=False, left=False)
        return log_prob + upper.sum((-1, -2)) + right.sum((-1, -2))

    assert_tape_matches(function, scale=0.5)


def test_data_movement_with_fixed_indices():
    labels = torch.tensor([0, 2, 1, 1, 0])
    index = torch.tensor([3, 0, 0])

    def function(x):
        picked = x[:, labels]  # locs[z]
        joined = torch.cat([x, x.flip(-1) * 2], -1)
        stacked = torch.stack([x, x**2], 1).sum(1)
        padded = torch.nn.functional.pad(x, (1, 2), value=0.5)
        added = x.new_zeros(BATCH, DIM).index_add(1, index, x[:, :3])
        accumulated = torch.zeros(DIM, dtype=torch.float64).index_put((index,), x[0, :3],
                                                                      accumulate=True)
        return (picked.exp().sum(-1) + joined.sum(-1) + stacked.sum(-1) + padded.prod(-1)
                + (added**2).sum(-1) + (accumulated**2).sum()
                + x.gather(1, index.expand(BATCH, 3)).sum(-1))

    assert_tape_matches(function)


def test_in_place_writes_into_fresh_and_constant_storage():
    constant = torch.zeros(BATCH, DIM + 1, dtype=torch.float64)

    def function(x):
        y = x.clone()
        y.mul_(2).add_(1)
        z = torch.zeros(BATCH, DIM + 1, dtype=torch.float64)
        z[:, 1:] = y  # copy_ into a view of a storage made without the point
        constant[:, 0] = 1.0  # a constant written in place before it is read
        return (z * constant.sum()).sum(-1) + y.exp().sum(-1)

    assert_tape_matches(function)


def test_float32_arithmetic_rounds_like_torch():
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float32)

    def function(x):
        single = (x.float() * weights).exp().sum(-1)  # float32 all the way
        return single.double() + x.sum(-1)

    rng = np.random.default_rng(3)
    example = torch.from_numpy(rng.normal(size=(BATCH, DIM)))
    tape = _tape.Tape(_value_and_grad(function), example)
    x = rng.normal(size=(BATCH, DIM))
    value, grad = tape(torch.from_numpy(x))
    expected_value, expected_grad = _eager_value_and_grad(function, x)
    np.testing.assert_allclose(value.numpy(), expected_value, rtol=1e-7)  # float32 rounding
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-6)


@pytest.mark.parametrize("function", [
    lambda x: (torch.softmax(x, -1) * torch.arange(1.0, 5.0, dtype=x.dtype)).sum(-1),
    lambda x: (torch.softmax(30 * x, -1) * torch.arange(1.0, 5.0, dtype=x.dtype)).sum(-1),
    lambda x: (torch.nn.functional.log_softmax(x, -1) * torch.linspace(-1, 2, 4,
                                                                     dtype=x.dtype)).sum(-1),
    lambda x: torch.nn.functional.log_softmax(20 * x.reshape(-1, 2, 2), 1)[:, 0, 1],
    lambda x: (torch.softmax(x.reshape(-1, 2, 2), 1) ** 2).sum((1, 2)),
], ids=["softmax", "softmax_steep", "log_softmax", "log_softmax_dim1", "softmax_squared"])
def test_softmax_runs_as_its_definition_on_the_tape(function):
    """No kernel needed: recorded as max-shift, exp, sum and divide (native.decompositions),
    and its backward as the softmax Jacobian's product, equal to eager torch."""
    tape = assert_tape_matches(function)
    assert tape.instructions > 0


@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_solve_runs_as_two_triangular_solves(upper):
    """A point-dependent SPD matrix per row, solved against a point-dependent vector."""
    base = torch.tensor([[2.0, 0.3, 0.1, 0.0], [0.3, 1.5, 0.2, 0.1],
                         [0.1, 0.2, 1.0, 0.3], [0.0, 0.1, 0.3, 1.2]], dtype=torch.float64)

    def function(x):
        matrix = base + torch.diag_embed(torch.exp(x))  # (batch, 4, 4)
        factor = torch.linalg.cholesky(matrix, upper=upper)
        solved = torch.cholesky_solve(torch.sin(x).unsqueeze(-1), factor, upper=upper)
        return (torch.sin(x) * solved.squeeze(-1)).sum(-1)

    assert_tape_matches(function)


_PLACES = torch.tensor([[2, 0, 3, 1]])
_GROUPS = torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize("function", [
    lambda x: (torch.zeros_like(x).scatter(1, _PLACES.expand(x.shape[0], 4), torch.sin(x))
               * torch.arange(1.0, 5.0, dtype=x.dtype)).sum(-1),
    lambda x: (torch.sin(x).scatter(1, torch.tensor([[1, 3]]).expand(x.shape[0], 2), 2.5)
               * torch.cos(x)).sum(-1),
    lambda x: (torch.zeros(x.shape[0], 2, dtype=x.dtype).scatter_add(
        1, _GROUPS.expand(x.shape[0], 4), torch.exp(x)) ** 2).sum(-1),
    lambda x: (x[:, :2].scatter_add(1, _GROUPS.expand(x.shape[0], 4), torch.exp(x))
               ** 2).sum(-1),
], ids=["scatter_src", "scatter_value", "scatter_add_into_zeros", "scatter_add_into_point"])
def test_scatter_with_fixed_indices(function):
    """scatter moves data (replayed on addresses); scatter_add accumulates group sums,
    as a hierarchical story sums its members per group."""
    assert_tape_matches(function)


_WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("function", [
    lambda x: (torch.sort(x, -1).values * _WEIGHTS).sum(-1),
    lambda x: (torch.sort(x.reshape(-1, 2, 2), 1, descending=True).values[:, 0] ** 2).sum(-1),
    lambda x: (torch.sort(x, stable=True, dim=-1).values.cumsum(-1) * _WEIGHTS).sum(-1),
    lambda x: torch.topk(x, 3).values.exp().sum(-1) + torch.topk(x, 2, largest=False).values[:, 0],
    lambda x: (torch.gather(torch.sin(x), 1, torch.argsort(x, -1)) * _WEIGHTS).sum(-1),
    lambda x: (torch.zeros_like(x).scatter(1, torch.argsort(x, -1), x.exp()) * _WEIGHTS).sum(-1),
    lambda x: (torch.zeros(x.shape[0], 4, dtype=x.dtype).scatter_add(
        1, torch.argsort(x, -1)[:, :2], x[:, :2] ** 2) * _WEIGHTS).sum(-1),
], ids=["sort", "sort_descending_dim1", "sort_stable", "topk", "argsort_gather",
        "scatter_by_argsort", "scatter_add_by_argsort"])
def test_a_sort_finds_its_permutation_at_every_run(function):
    """The permutation depends on the point: the tape sorts at every run (``I_SORT``), and
    the backward scatters the gradient back by it (``I_INDEXED``). Checked at points
    other than the one recorded, where the order differs."""
    assert_tape_matches(function)


#: Near a permutation: a factorisation of these matrices must swap rows
_SWAPS = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]]
_MIX = torch.tensor([[0.4, -0.2, 0.1, 0.3], [0.2, 0.5, -0.3, 0.1],
                     [-0.1, 0.3, 0.2, -0.4], [0.3, 0.1, 0.4, 0.2]], dtype=torch.float64)


def _matrix(x):
    return 2 * _SWAPS + torch.tanh(x)[:, :, None] * _MIX  # (batch, 4, 4)


@pytest.mark.parametrize("function", [
    lambda x: torch.linalg.slogdet(_matrix(x)).logabsdet,
    lambda x: torch.linalg.slogdet(_matrix(x)).sign * x[:, 0],
    lambda x: torch.logdet(_matrix(x) @ _matrix(x).mT),
    lambda x: torch.linalg.det(_matrix(x)),
    lambda x: torch.linalg.det(_matrix(x).mT.contiguous()),
    lambda x: (torch.linalg.solve(_matrix(x), torch.sin(x)) ** 2).sum(-1),
    lambda x: torch.linalg.solve(_matrix(x), torch.sin(x)[:, :, None] * x[:, None, :2]).sum((1, 2)),
    lambda x: torch.linalg.solve(_matrix(x), x[:, None, :], left=False).sum((1, 2)),
    lambda x: (torch.linalg.inv(_matrix(x)) @ x[:, :, None]).sum((1, 2)),
], ids=["slogdet", "slogdet_sign", "logdet", "det", "det_columns", "solve_vector",
        "solve_matrix", "solve_right", "inverse"])
def test_lu_operations_pivot_at_every_run(function):
    """slogdet, det, solve and inv factor ``P L U`` on the tape (``I_LU``), the pivots
    found from the point, and their backward solves with the factors (``I_LUSOLVE``)."""
    assert_tape_matches(function)


@pytest.mark.parametrize("function", [
    lambda x: torch.linalg.slogdet(_matrix(x)).logabsdet,
    lambda x: torch.linalg.det(_matrix(x)),
    lambda x: (torch.linalg.solve(_matrix(x), torch.sin(x)) ** 2).sum(-1),
], ids=["slogdet", "det", "solve"])
def test_a_factor_recorded_where_the_matrix_is_symmetric_is_the_one_torch_uses(function):
    """At the origin ``_matrix`` is twice a permutation: A and its transpose have the same
    factor there, and only torch's rule (slogdet and det factor the transpose of a
    C-contiguous matrix) says which one its backward solves with elsewhere."""
    tape = _tape.Tape(_value_and_grad(function), torch.zeros(BATCH, DIM, dtype=torch.float64))
    x = np.random.default_rng(3).normal(size=(BATCH, DIM))
    value, grad = tape(torch.from_numpy(x))
    expected_value, expected_grad = _eager_value_and_grad(function, x)
    np.testing.assert_allclose(value.numpy(), expected_value, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-9, atol=1e-12)


def test_a_singular_matrix_has_log_determinant_minus_infinity():
    def function(x):
        matrix = torch.ones(x.shape[0], 3, 3, dtype=x.dtype) * x[:, :1, None]
        return torch.linalg.slogdet(matrix + torch.diag_embed(x[:, 1:])).logabsdet

    tape = _tape.Tape(_value_and_grad(function), torch.ones(BATCH, 4, dtype=torch.float64))
    points = np.ones((BATCH, 4))
    points[1, 1:] = 0.0  # all ones: rank 1
    value, _ = tape(torch.from_numpy(points))
    expected, _ = _eager_value_and_grad(function, points)
    assert value[1] == -math.inf == expected[1]
    np.testing.assert_allclose(value.numpy()[[0, 2]], expected[[0, 2]], rtol=1e-12)


def test_an_index_from_the_point_outside_its_tensor_raises_as_torch_does():
    def function(x):
        index = (x.abs() * 2).long()  # 0 or 1 where recorded; 4 and beyond elsewhere
        return torch.gather(x, 1, index).sum(-1)

    tape = _tape.Tape(_value_and_grad(function),
                      torch.full((BATCH, DIM), 0.3, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        function(torch.full((BATCH, DIM), 3.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="outside its tensor"):
        tape(torch.full((BATCH, DIM), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("function", [
    lambda x: torch.linalg.eigvalsh(x[:, :, None] * x[:, None, :]).sum(-1),
    lambda x: x.sum(-1) * float(x[0, 0].item()),
    lambda x: torch.nn.functional.gelu(x).sum(-1),
], ids=["eigvalsh", "item", "gelu"])
def test_operations_without_a_kernel_are_refused(function):
    with pytest.raises(_tape.Unsupported):
        _tape.Tape(_value_and_grad(function), torch.randn(BATCH, DIM, dtype=torch.float64))


def test_a_failed_cholesky_is_an_error_the_potential_turns_into_infinity():
    def function(x):
        matrix = torch.eye(2) + x[:, :1, None] * torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        return torch.linalg.cholesky(matrix).diagonal(dim1=-2, dim2=-1).log().sum(-1)

    tape = _tape.Tape(_value_and_grad(function), torch.zeros(BATCH, DIM, dtype=torch.float64))
    points = torch.zeros(BATCH, DIM, dtype=torch.float64)
    points[1, 0] = 3.0  # eigenvalues 1 +- 3: not positive definite
    with pytest.raises(RuntimeError, match="positive-definite"):
        tape(points)


def test_an_unknown_instruction_is_called_a_bug_and_never_an_infinite_potential():
    """Status -2 is the translator's bug (issue 29): not a Cholesky failure, not +inf."""
    data = logistic.prepare_data(_logistic_data())
    potential = BatchedPotential(logistic, data, 2, compiler="tape")
    tape = potential._value_and_grad  # this process's cached tape: restored below
    points = np.zeros((2, potential.dim))
    first = int(tape.code[0])
    tape.code[0] = 99  # the first opcode, corrupted
    try:
        with pytest.raises(_tape.TapeError, match="instruction the interpreter does not know"):
            potential(points)
    finally:
        tape.code[0] = first
    assert np.isfinite(potential(points)[0]).all()


# -- stories as users write them ---------------------------------------------------------

@model(observed={"obs": "y"})
def logistic(X, y=None):
    """Pyro's own style: a weight vector, ``X @ w``, a plate-free Bernoulli likelihood."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    pyro.sample("obs", dist.Bernoulli(logits=X @ w + b).to_event(1), obs=y)


@model(observed=["height"])
def mixture(height=None):
    """A two-component mixture written with ``locs[z]`` and an enumerated z."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(torch.tensor([160.0, 175.0]), 10.0).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(10.0))
    with pyro.plate("people", len(height)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("height", dist.Normal(locs[z], scale), obs=height)


@model(observed={"y": "y"})
def softmax_simplex(y=None):
    """Category weights as a softmax of free logits, as users write a simplex without a
    Dirichlet; Categorical(probs=...) normalises them again."""
    logits = pyro.sample("logits", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("draws", len(y)):
        pyro.sample("y", dist.Categorical(probs=torch.softmax(logits, -1)), obs=y)


@model(observed={"y": "y"})
def gp_cholesky_solve(x, y=None):
    """A GP regression's marginal likelihood written out with ``torch.cholesky_solve``."""
    length = pyro.sample("length", dist.LogNormal(0.0, 1.0))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    kernel = torch.exp(-0.5 * (x.unsqueeze(-1) - x.unsqueeze(-2)) ** 2 / length**2)
    covariance = kernel + (noise**2 + 1e-6) * torch.eye(len(x))
    factor = torch.linalg.cholesky(covariance)
    quadratic = (y.unsqueeze(-1) * torch.cholesky_solve(y.unsqueeze(-1), factor)).sum((-2, -1))
    log_det = 2 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)
    pyro.factor("y", -0.5 * (quadratic + log_det + len(x) * math.log(2 * math.pi)))


@model(observed={"x": "x"})
def unmixing(x=None):
    """Independent Laplace sources seen through an unknown 2 x 2 mixing matrix (ICA):
    :math:`\\log p(x \\mid A) = \\sum \\log p_s(A^{-1} x) - N \\log|\\det A|`, written
    with ``torch.linalg.solve`` and ``slogdet`` as a user writes it."""
    mixing = pyro.sample("mixing", dist.Normal(torch.eye(2), 1.0).to_event(2))
    sources = torch.linalg.solve(mixing, x.mT).mT  # (N, 2)
    log_det = torch.linalg.slogdet(mixing).logabsdet
    pyro.factor("x", dist.Laplace(0.0, 1.0).log_prob(sources).sum((-2, -1))
                - x.shape[-2] * log_det)


@model(observed=["y"])
def ordered_mixture(y=None):
    """Component means kept in order by sorting free draws, as users break a mixture's
    label switching."""
    locs = torch.sort(pyro.sample("raw", dist.Normal(0.0, 5.0).expand([3]).to_event(1)),
                      -1).values
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    weights = torch.full((3,), 1 / 3)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.MixtureSameFamily(dist.Categorical(weights),
                                                dist.Normal(locs, scale)), obs=y)


def _logistic_data():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=generator)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -2.0, 0.5])), generator=generator)
    return {"X": X, "y": y}


@pytest.mark.parametrize("story, data", [
    (logistic, _logistic_data()),
    (mixture, {"height": torch.tensor([158.0, 171.0, 180.0, 162.0, 176.5, 169.0])}),
    (softmax_simplex, {"y": torch.tensor([0, 2, 2, 1, 2, 0, 2])}),
    (gp_cholesky_solve, {"x": torch.linspace(0.0, 3.0, 7),
                         "y": torch.tensor([0.1, 0.7, 0.9, 0.4, -0.3, -0.8, -0.5])}),
    (unmixing, {"x": torch.tensor([[0.3, -1.2], [1.5, 0.4], [-0.7, 0.9], [2.1, -0.3]])}),
    (ordered_mixture, {"y": torch.tensor([-4.1, -3.2, 0.3, 0.8, 5.2, 6.0, -3.7])}),
], ids=["logistic", "mixture", "softmax_simplex", "gp_cholesky_solve", "unmixing",
        "ordered_mixture"])
def test_user_stories_run_on_their_tape(story, data):
    data = story.prepare_data(data)
    taped = BatchedPotential(story.marginal, data, 4, compiler="tape")
    assert taped.compiler == "tape"
    eager = BatchedPotential(story.marginal, data, 4, compiler="none")
    points = np.random.default_rng(0).normal(size=(4, eager.dim))
    for got, expected in zip(taped(points), eager(points), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_a_story_the_tape_cannot_record_falls_back(monkeypatch):
    @model(observed=["y"])
    def spectrum_story(y=None):
        x = pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        spectrum = torch.linalg.eigvalsh(torch.diag(x) + 0.1)
        pyro.sample("y", dist.Normal(spectrum, 1.0).to_event(1), obs=y)

    monkeypatch.setattr("ppl_notes.evaluation.potential.compiler_available", lambda: False)
    data = spectrum_story.prepare_data({"y": torch.tensor([-1.0, 0.0, 2.0])})
    potential = BatchedPotential(spectrum_story, data, 2, compiler="tape")
    assert potential.compiler == "none"
    points = np.random.default_rng(1).normal(size=(2, 3))
    expected = _eager_value_and_grad(potential._potential, points)
    np.testing.assert_allclose(potential(points)[0], expected[0])


def test_nuts_reports_the_tape():
    fit = infer(logistic, _logistic_data(), method="nuts", chains=2, warmup=200, draws=200,
                processes=1, progress=False)
    assert fit.info["compiler"] == "tape"


def test_the_python_codes_are_the_enums_of_the_c_interpreter():
    import re

    from ppl_notes.native import arena

    source = _tape.SOURCE.read_text()
    functions = re.search(r"enum \{\s*F_CONST = 0,(.*?)\};", source, re.S).group(1)
    names = ["CONST"] + [n.strip()[2:] for n in functions.split(",") if n.strip()]
    assert names == list(arena.F)
    kinds = re.search(r"enum \{ I_MAP = 1,(.*?)\};", source, re.S).group(1)
    names = ["I_REDUCE", "I_SCAN", "I_MATMUL", "I_CHOL", "I_TRISOLVE", "I_GATHER", "I_SCATTER",
             "I_LU", "I_LUSOLVE", "I_SORT", "I_INDEXED"]
    assert [n.strip() for n in kinds.split(",")] == names
    assert [getattr(arena, n) for n in ["I_MAP", *names]] == list(range(1, 13))
    reductions = re.search(r"enum \{ R_SUM = 0,(.*?)\};", source).group(1)
    assert len(reductions.split(",")) + 1 == arena.R_ALL + 1
    assert f"#define MAXDIM {arena.MAX_DIMS}" in source


def test_an_address_outside_the_arena_is_a_translator_bug_named_before_c_runs():
    """The interpreter does not check bounds: views and resolved addresses are checked
    when the tape is made, so a translator bug is a TapeError, never a stray write."""
    from ppl_notes.native.arena import Address, Buffer, Instruction, TapeError, View, resolve

    buffer = Buffer(0, 6, torch.float64, "work")
    View(buffer, 2, (2, 2), (2, 1))  # elements 2..5: inside
    with pytest.raises(TapeError, match="reaches elements 2..6 of a buffer of 6"):
        View(buffer, 2, (2, 3), (2, 1))
    with pytest.raises(TapeError, match="reaches elements -1"):
        View(buffer, 1, (3,), (-1,))
    View(buffer, 9, (0, 4), (1, 1))  # empty: nothing is reached
    buffer.base = 4
    with pytest.raises(TapeError, match="outside the arena of 8 elements"):
        resolve([Instruction([1, Address(buffer, 5)])], size=8)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits far out in both tails
def test_bernoulli_logits_runs_on_the_tape_as_eager_torch(scale):
    """Pyro's Bernoulli(logits=...) calls binary_cross_entropy_with_logits: one kernel."""
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    weights = torch.tensor([[0.3, -1.2, 2.0, 0.7]], dtype=torch.float64)

    def log_density(x):
        logits = x * weights
        return pyro.distributions.Bernoulli(logits=logits).log_prob(y).sum(-1)

    assert_tape_matches(log_density, scale=scale)  # recording raises Unsupported without it


_SHIFT = {"value": torch.tensor(0.0)}


@model(observed=["y"])
def shifted(y=None):
    """A story that reads a constant it closes over at every run."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu + _SHIFT["value"], 1.0), obs=y)


def test_a_stale_tape_is_caught_by_the_check_against_the_story(caplog):
    """The tape is kept per story and data; a constant changed since makes the story
    disagree with it at the prior check points (the path choice's own evaluation there,
    read back, not a run of its own), and the potential runs uncompiled."""
    data = shifted.prepare_data({"y": torch.tensor([0.5, -0.2, 1.1])})
    first = BatchedPotential(shifted, data, 2, compiler="tape")
    assert first.compiler == "tape" and first.facts.check_gradient is not None
    _SHIFT["value"] = torch.tensor(3.0)
    try:
        second = BatchedPotential(shifted, data, 2, compiler="tape")
        assert second.compiler == "none"
        assert "differs from the story" in caplog.text
        points = np.array([[0.3], [-1.0]])
        np.testing.assert_allclose(second(points)[0], _eager_value_and_grad(
            second._potential, points)[0])
    finally:
        _SHIFT["value"] = torch.tensor(0.0)
