"""ppl_notes.psis equals arviz_stats' PSIS (Vehtari et al. 2024) on the ratios VI meets:
light tails (q wider than p), heavy ones (q too narrow), small samples and ties."""

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl_notes.psis import psis_log_weights


def _arviz(log_ratios):
    import arviz_stats  # noqa: F401 - registers the accessor

    # arviz_stats smooths the negation of its input (LOO's ratios are 1/p(y_i | theta))
    weights, khat = xr.DataArray(-log_ratios, dims=["sample"]).azstats.psislw(dim=["sample"])
    return np.asarray(weights.values, dtype=float), float(khat)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(size=st.sampled_from([30, 100, 226, 1000, 4000]), scale=st.floats(0.01, 5.0),
       heavy=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_arviz_stats(size, scale, heavy, seed):
    rng = np.random.default_rng(seed)
    log_ratios = (rng.standard_t(2, size) if heavy else rng.normal(size=size)) * scale
    ours, khat = psis_log_weights(log_ratios)
    theirs, their_khat = _arviz(log_ratios)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert khat == pytest.approx(their_khat, rel=1e-9) or (np.isnan(khat)
                                                           and np.isnan(their_khat))


def test_too_few_draws_and_equal_tails_are_errors_as_in_arviz():
    with pytest.raises(ValueError, match="at least 5"):
        psis_log_weights(np.zeros(20))
    with pytest.raises(ValueError, match="same"):
        psis_log_weights(np.zeros(200))


def test_columns_are_smoothed_each_on_its_own_as_arviz_does():
    rng = np.random.default_rng(3)
    columns = np.column_stack([rng.normal(size=1000) * s for s in (0.1, 1.0, 3.0)]
                              + [rng.standard_t(2, 1000)])
    weights, khat = psis_log_weights(columns, r_eff=0.8)
    for i in range(columns.shape[1]):
        ours, their_khat = psis_log_weights(columns[:, i], r_eff=0.8)
        np.testing.assert_allclose(weights[:, i], ours, rtol=1e-14)  # summation order
        assert khat[i] == pytest.approx(their_khat, rel=1e-14)


def _loo_tree(rng, chains=4, draws=500, observations=60):
    """A normal-mean posterior's draws with its pointwise log-likelihood."""
    y = rng.normal(1.0, 1.0, observations)
    mu = rng.normal(y.mean(), 1 / np.sqrt(observations), (chains, draws))
    log_lik = -0.5 * (y - mu[..., None]) ** 2 - 0.5 * np.log(2 * np.pi)
    log_q = -0.5 * ((mu - y.mean()) * np.sqrt(observations)) ** 2
    log_p = log_lik.sum(-1) - 0.5 * mu**2 / 100
    return xr.DataTree.from_dict({
        "posterior": xr.Dataset({"mu": (("chain", "draw"), mu)}),
        "log_likelihood": xr.Dataset({"y": (("chain", "draw", "obs"), log_lik)}),
        "sample_stats": xr.Dataset({"log_p": (("chain", "draw"), log_p),
                                    "log_q": (("chain", "draw"), log_q)}),
        "observed_data": xr.Dataset({"y": (("obs",), y)})})


@pytest.mark.parametrize("kind", ["mcmc", "variational", "resampled"])
def test_loo_equals_arviz_stats(kind):
    """ppl_notes.loo's own vectorised PSIS-LOO against arviz_stats' loops.

    ``resampled``: draws the importance step resampled towards p are posterior draws:
    plain PSIS-LOO, with r_eff from the weights' ESS (1/(1/S + 1/E) per restart).
    """
    import arviz_stats

    from ppl_notes.cross_validation import _loo

    tree = _loo_tree(np.random.default_rng(4))

    class Fit:  # the flags _loo reads, and the tree
        is_mcmc, is_variational = kind == "mcmc", kind != "mcmc"
        has_chains, importance_corrected = True, kind == "resampled"
        sample_dims = ["chain", "draw"]
        info = {"importance": {"ess": [1000.0, 2000.0, 500.0, 4000.0]}}

    fit = Fit()
    fit.tree = tree
    ours = _loo(fit, tree, True, None)
    if kind == "mcmc":
        theirs = arviz_stats.loo(tree, pointwise=True)
    elif kind == "resampled":
        r_eff = np.mean([1 / (1 / 500 + 1 / e) for e in Fit.info["importance"]["ess"]]) / 500
        theirs = arviz_stats.loo(tree, pointwise=True, reff=r_eff)
    else:
        stats = tree["sample_stats"]
        theirs = arviz_stats.loo_approximate_posterior(tree, stats["log_p"], stats["log_q"],
                                                       pointwise=True)
    for name in ("elpd", "se", "p"):
        assert getattr(ours, name) == pytest.approx(getattr(theirs, name), rel=1e-10), name
    np.testing.assert_allclose(ours.pareto_k.values, theirs.pareto_k.values, rtol=1e-9)
    np.testing.assert_allclose(ours.elpd_i.values, theirs.elpd_i.values, rtol=1e-10)
    assert ours.approx_posterior == theirs.approx_posterior
