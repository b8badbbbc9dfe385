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
