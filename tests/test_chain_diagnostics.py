"""Our R-hat, ESS and E-BFMI are arviz_stats' numbers (the truth here is ArviZ's code).

``ppl_notes.chain_diagnostics`` exists so that the checks after every MCMC run need not
import arviz_stats (1.0 s); each number must equal ArviZ's, to rounding, on chains that
mix, chains that do not, heavy tails, ties (repeated values, as rejected proposals
leave) and constant draws.
"""

import arviz_stats
import numpy as np
import pytest
import xarray as xr

from ppl_notes import chain_diagnostics as chains


def _ar1(rng, shape, phi=0.9):
    out = np.empty(shape)
    out[:, 0] = rng.normal(size=shape[0])
    for t in range(1, shape[1]):
        out[:, t] = phi * out[:, t - 1] + np.sqrt(1 - phi**2) * rng.normal(size=shape[0])
    return out


def _cases():
    rng = np.random.default_rng(0)
    stuck = _ar1(rng, (4, 500))
    stuck[1] += 3.0  # one chain elsewhere: R-hat large
    ties = np.round(_ar1(rng, (4, 400)), 1)  # many repeated values
    wide = rng.standard_cauchy((3, 301))  # odd draw count, heavy tails
    scale = rng.normal(size=(4, 200)) * np.array([[1.0], [1.0], [1.0], [5.0]])
    return {"ar1": _ar1(rng, (4, 1000)), "stuck": stuck, "ties": ties, "cauchy": wide,
            "scale": scale, "one_chain": _ar1(rng, (1, 500))}


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rhat_and_ess_equal_arviz_stats(name):
    draws = CASES[name]
    expected_bulk = float(arviz_stats.ess(draws, method="bulk"))
    expected_tail = float(arviz_stats.ess(draws, method="tail", prob=(0.05, 0.95)))
    assert chains.ess_bulk(draws) == pytest.approx(expected_bulk, rel=1e-9)
    assert chains.ess_tail(draws, (0.05, 0.95)) == pytest.approx(expected_tail, rel=1e-9)
    # the default is the one ArviZ's summary() uses (its ci_prob), not the paper's 5%/95%
    default = float(xr.DataArray(draws, dims=["chain", "draw"]).azstats.ess(method="tail"))
    assert chains.ess_tail(draws) == pytest.approx(default, rel=1e-9)
    if draws.shape[0] > 1:
        assert chains.rhat(draws) == pytest.approx(float(arviz_stats.rhat(draws)), rel=1e-12)
    else:
        assert np.isnan(chains.rhat(draws))


def test_rhat_sees_a_stuck_chain_and_a_wider_one():
    assert chains.rhat(CASES["stuck"]) > 1.3
    assert chains.rhat(CASES["scale"]) > 1.05  # only the folded R-hat sees a scale change
    assert chains.rhat(CASES["ar1"]) < 1.05


def test_constant_and_nan_draws():
    assert chains.ess_bulk(np.ones((2, 50))) == 100
    with_nan = CASES["ar1"].copy()
    with_nan[0, 3] = np.nan
    assert np.isnan(chains.rhat(with_nan)) and np.isnan(chains.ess_bulk(with_nan))
    assert np.isnan(chains.ess_bulk(np.zeros((2, 3))))  # under 4 draws per chain


def test_bfmi_equals_arviz_stats():
    energy = _ar1(np.random.default_rng(1), (4, 300), phi=0.5) * 10
    expected = np.asarray(arviz_stats.bfmi(energy))
    np.testing.assert_allclose(chains.bfmi(energy), expected, rtol=1e-12)


def test_average_ranks_equal_scipy():
    from scipy.stats import rankdata

    values = np.round(np.random.default_rng(2).normal(size=(3, 40)), 1)
    np.testing.assert_array_equal(chains.average_ranks(values),
                                  rankdata(values, method="average").reshape(values.shape))


def test_every_element_at_once_equals_each_alone():
    """The batched forms are the scalar ones, element by element (NaN rows stay NaN)."""
    same_shape = [CASES[n][:, :200] for n in ("ar1", "stuck", "ties", "scale")]
    with_nan = CASES["ar1"][:, :200].copy()
    with_nan[2, 7] = np.nan
    draws = np.stack(same_shape + [with_nan, np.ones((4, 200))])
    np.testing.assert_allclose(chains.rhat_of_elements(draws),
                               [chains.rhat(d) for d in draws], rtol=1e-12)
    np.testing.assert_allclose(chains.ess_bulk_of_elements(draws),
                               [chains.ess_bulk(d) for d in draws], rtol=1e-12)
    np.testing.assert_allclose(chains.ess_tail_of_elements(draws, (0.05, 0.95)),
                               [chains.ess_tail(d, (0.05, 0.95)) for d in draws], rtol=1e-12)
    assert np.isnan(chains.rhat_of_elements(draws)[4])
    together = chains.checks_of_elements(draws, (0.05, 0.95))
    np.testing.assert_allclose(together["rhat"], chains.rhat_of_elements(draws), rtol=1e-12)
    np.testing.assert_allclose(together["ess_bulk"], chains.ess_bulk_of_elements(draws),
                               rtol=1e-12)
