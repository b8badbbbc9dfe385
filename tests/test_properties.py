"""Property-based tests (hypothesis): whatever data a user passes, ``infer`` returns finite
results or raises one of ppl_notes' errors: never a NaN result, never a traceback from
torch or Pyro for a user mistake."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ppl_notes import PPLNotesError, infer
from ppl_notes.models.conjugate import normal_mean
from ppl_notes.models.heights import model as heights

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FAST = {"svi": {"steps": 20, "num_draws": 20, "jit": False}, "map": {"steps": 50},
        "em": {"iterations": 30}}


def _finite_or_ours(story, data, method):
    try:
        fit = infer(story, data, method=method, progress=False, **FAST[method])
    except PPLNotesError:
        return None
    for site in fit.to_arviz()["posterior"].data_vars:
        assert np.isfinite(fit[site]).all(), site
    return fit


@SETTINGS
@given(x=arrays(np.float64, st.integers(1, 60),
                elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)),
       method=st.sampled_from(["svi", "map"]))
def test_conjugate_story_on_any_finite_data(x, method):
    _finite_or_ours(normal_mean, {"x": x}, method)


@SETTINGS
@given(x=arrays(np.float64, st.integers(2, 40),
                elements=st.floats(50.0, 250.0, allow_nan=False, allow_infinity=False)),
       method=st.sampled_from(["svi", "map", "em"]))
def test_heights_story_on_any_plausible_heights(x, method):
    _finite_or_ours(heights, {"height": x}, method)


bad_values = st.sampled_from([math.nan, math.inf, -math.inf])


KINDS = ["non-finite", "matrix", "empty", "text", "ragged"]


@st.composite
def broken_data(draw, kind):
    """Data with a NaN or infinity somewhere, of the wrong rank, empty, or not numbers."""
    size = draw(st.integers(1, 30))
    if kind == "non-finite":
        x = np.asarray(draw(arrays(np.float64, size, elements=st.floats(-10, 10))))
        x[draw(st.integers(0, size - 1))] = draw(bad_values)
        return x
    if kind == "matrix":
        return np.zeros((size, draw(st.integers(2, 4))))
    if kind == "empty":
        return np.zeros(0)
    if kind == "text":
        return [draw(st.text(min_size=1, max_size=3)) for _ in range(size)]
    return [[1.0] * draw(st.integers(1, 3)) for _ in range(size)] + [[1.0] * 4]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data(), story=st.sampled_from(["normal_mean", "heights"]),
       method=st.sampled_from(["svi", "map", "nuts"]))
def test_broken_data_is_always_our_error(kind, data, story, method):
    x = data.draw(broken_data(kind))
    target, key = (normal_mean, "x") if story == "normal_mean" else (heights, "height")
    with pytest.raises(PPLNotesError):
        infer(target, {key: x}, method=method, progress=False)
