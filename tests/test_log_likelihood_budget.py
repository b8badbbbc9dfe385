"""The pointwise log-likelihood is stored within a budget, or as asked (issue 41 item 9).

4000 draws of a million observed values are 32 GB: a fit that stored them unasked was
killed for three parameters. Here the budget is lowered so that small fits cross it.
"""

import numpy as np
import pytest
import torch

import ppl_notes as pn
from ppl_notes.errors import OptionError, OptionTypeError
from ppl_notes.evaluation import log_likelihood_budget
from ppl_notes.evaluation.log_likelihood_budget import expected_draws
from ppl_notes.models import get_story
from tests.corpus.user_stories_two import straight_line

line = pn.model(observed="y")(straight_line)


def _data(rows=200):
    rng = np.random.default_rng(0)
    x = rng.normal(size=rows)
    return {"x": torch.tensor(x), "y": torch.tensor(1 + 2 * x + rng.normal(size=rows))}


def test_over_the_budget_the_log_likelihood_is_not_stored_and_loo_says_why(
        monkeypatch, tmp_path):
    monkeypatch.setattr(log_likelihood_budget, "POINTWISE_BUDGET", 10_000)
    fit = pn.infer(line, data=_data(), method="svi", guide="meanfield", progress=False)
    assert "log_likelihood" not in fit.tree.children
    assert "4,000 draws x 200 observed values" in fit.info["log_likelihood"]
    with pytest.raises(OptionError, match=r"log_likelihood=True"):
        pn.loo(fit)
    fit.save(tmp_path / "fit.nc")
    loaded = pn.load(tmp_path / "fit.nc", model=line)
    assert "log_likelihood" not in loaded.tree.children
    with pytest.raises(OptionError, match=r"log_likelihood=True"):
        pn.loo(loaded)
    page = pn.write_report(fit, out=tmp_path / "report")["report"].read_text()
    assert "no pointwise log-likelihood, not stored: 4,000 draws" in page
    # the draws themselves are those of a fit that stores it
    stored = pn.infer(line, data=_data(), method="svi", guide="meanfield", progress=False,
                      log_likelihood=True)
    np.testing.assert_array_equal(stored.draws("b"), fit.draws("b"))
    assert stored.tree["log_likelihood"]["y"].shape[-1] == 200
    assert np.isfinite(pn.loo(stored, warn=False).elpd)


def test_asked_for_or_refused_whatever_the_size():
    never = pn.infer(line, data=_data(), method="svi", guide="meanfield", progress=False,
                     log_likelihood=False)
    assert "log_likelihood" not in never.tree.children
    assert "log_likelihood=False" in never.info["log_likelihood"]
    with pytest.raises(OptionTypeError, match="log_likelihood must be True, False or None"):
        pn.infer(line, data=_data(), method="svi", log_likelihood="yes", progress=False)


def test_the_decision_reaches_a_hand_marginalised_story(monkeypatch):
    """Galton's heights run NUTS and VI on their hand-marginalised form, with facts of its
    own: the budget's decision must reach them too."""
    monkeypatch.setattr(log_likelihood_budget, "POINTWISE_BUDGET", 10_000)
    fit = pn.infer(get_story("heights").load_model(), method="svi", guide="meanfield",
                   progress=False)
    assert "log_likelihood" not in fit.tree.children
    assert fit.info["log_likelihood"].startswith("not stored")


def test_expected_draws():
    assert expected_draws({"chains": 4, "draws": 1000, "thin": 3}) == 4 * 334
    assert expected_draws({"num_draws": 1000, "restarts": None}) == 4000
    assert expected_draws({"num_draws": 500, "restarts": 2}) == 1000
    assert expected_draws({"num_draws": 1000}) == 1000
    assert expected_draws({}) == 1
