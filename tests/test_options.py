import pytest

from ppl_notes import DataError, OptionError, OptionTypeError, StoryError, infer
from ppl_notes.models.conjugate import normal_mean


def test_unknown_method_lists_the_methods():
    with pytest.raises(OptionError,
                       match=r"unknown method 'hmc'.*'map', 'mle', 'nuts', 'pathfinder', 'svi'"):
        infer(normal_mean, method="hmc")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(OptionError, match=r"no option 'step'.*did you mean 'steps'"):
        infer(normal_mean, method="svi", step=10)
    with pytest.raises(OptionError, match="its options are .*'target_accept'"):
        infer(normal_mean, method="nuts", tree_depth=3)


@pytest.mark.parametrize(
    ("method", "options", "error", "message"),
    [
        ("svi", {"steps": 0}, OptionError, "'steps' must be an integer >= 1"),
        ("svi", {"learning_rate": -0.1}, OptionError, "'learning_rate' must be a number > 0"),
        ("svi", {"steps": 10.5}, OptionTypeError, "'steps' must be int"),
        ("nuts", {"chains": 0}, OptionError, "'chains' must be an integer >= 1"),
        ("nuts", {"target_accept": 1.0}, OptionError, r"must be a number in \(0, 1\)"),
        ("nuts", {"draws": True}, OptionTypeError, "'draws' must be int"),
        ("nuts", {"engine": "stan"}, OptionError, r"'engine' must be one of \['fast', 'pyro'\]"),
    ],
)
def test_options_out_of_range_or_of_the_wrong_type(method, options, error, message):
    with pytest.raises(error, match=message):
        infer(normal_mean, method=method, progress=False, **options)


def test_a_plain_callable_needs_data_and_anything_else_is_refused():
    """A plain Pyro model is a story (issue 30); without the decorator it has no default
    data to fall back on, and a value that is not callable is no model at all."""
    with pytest.raises(DataError, match="without @ppl_notes.model has no default data"):
        infer(lambda x=None: None)
    with pytest.raises(StoryError, match="needs a Pyro model"):
        infer(42, {"x": 1.0})


def test_nuts_takes_no_guide():
    from ppl_notes.guides.conjugate import normal_mean_guide

    with pytest.raises(OptionError, match="takes no guide"):
        infer(normal_mean, method="nuts", guide=normal_mean_guide)


def test_options_of_the_new_methods_are_checked_by_name_and_range():
    with pytest.raises(OptionError, match="power.*0.5, 1"):
        infer(normal_mean, method="bbvi", power=0.4)
    with pytest.raises(OptionError, match="no option 'iteration'.*did you mean 'iterations'"):
        infer(normal_mean, method="em", iteration=3)
    with pytest.raises(OptionError, match="takes no guide"):
        from ppl_notes.guides.conjugate import normal_mean_guide

        infer(normal_mean, method="map", guide=normal_mean_guide)
    with pytest.raises(OptionError, match="estimator"):
        infer(normal_mean, method="svi", estimator="pathwise")


def test_numpy_integers_are_integers_and_a_negative_seed_is_named():
    import numpy as np

    from ppl_notes import infer
    from ppl_notes.errors import OptionError
    from ppl_notes.models.conjugate import normal_mean

    fit = infer(normal_mean, method="svi", seed=np.int64(3), steps=np.int64(20), progress=False)
    assert fit.to_arviz().attrs["seed"] == 3
    with pytest.raises(OptionError, match=r"seed must be an integer in \[0, 2\*\*32\), got -1"):
        infer(normal_mean, method="svi", seed=-1, steps=5, progress=False)


def test_summary_shows_the_same_94_percent_interval_as_compare():
    fit = infer(normal_mean, method="svi", steps=20, progress=False)
    columns = " ".join(fit.summary().columns)
    assert "94" in columns and "89" not in columns
