"""write_report on ordinary inputs: VI posteriors only, two MCMC fits, a hierarchical
story with 71 groups, an observed site without a plate. Stories as a user writes them."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import infer, model, write_report
from ppl_notes.guides.conjugate import normal_mean_guide
from ppl_notes.models.conjugate import normal_mean
from ppl_notes.report import figure_sites

NUTS = dict(method="nuts", chains=2, warmup=150, draws=100, processes=1, compiler="none",
            progress=False)


@model(observed="y")
def schools71(group, y, n_groups):
    """Partial pooling of 71 groups: ``theta[group]`` indexes as in Pyro's examples."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", n_groups):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(theta[group], 1.0), obs=y)


@model(observed="y")
def mean_without_plate(y):
    """The observations as one event (``to_event``), without a plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    pyro.sample("y", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)


def _read(written):
    page = written["report"].read_text()
    assert "<img" in page and "Traceback" not in page
    return page


def test_a_report_of_variational_posteriors_only(tmp_path):
    autonormal = infer(normal_mean, method="svi", steps=200, progress=False)
    handwritten = infer(normal_mean, method="svi", steps=200, guide=normal_mean_guide,
                        progress=False)
    written = write_report(autonormal, handwritten, out=tmp_path)
    page = _read(written)
    assert {"ppc", "elbo", "marginals"} <= set(written) and "trace" not in written
    assert "normal_mean: VI posteriors" in page


def test_a_report_of_two_mcmc_fits_with_a_named_reference(tmp_path):
    first = infer(normal_mean, seed=0, **NUTS)
    second = infer(normal_mean, seed=1, **NUTS)
    written = write_report({"first": first, "second": second}, out=tmp_path,
                           reference="second")
    page = _read(written)
    assert {"forest", "trace", "rank"} <= set(written)
    assert "Reference posterior: <b>second</b>" in page


@pytest.fixture(scope="module")
def schools71_fits():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(71), 3)
    data = {"group": torch.tensor(group), "n_groups": 71,
            "y": torch.tensor(rng.normal(rng.normal(size=71)[group], 1.0),
                              dtype=torch.float32)}
    return (infer(schools71, data, method="svi", steps=300, progress=False),
            infer(schools71, data, **NUTS))


def test_a_large_models_report_draws_the_top_level_and_tables_the_rest(tmp_path,
                                                                        schools71_fits):
    """73 parameters: mu and tau are drawn; theta's 71 elements are in the tables."""
    svi, nuts = schools71_fits
    fits = {"svi": svi, "nuts": nuts}
    assert figure_sites(fits) == (["mu", "tau"], {"theta": 71})
    written = write_report(fits, out=tmp_path / "all")
    page = _read(written)
    assert "In the tables only: theta (71 elements)" in page
    table = np.genfromtxt(written["parameters"], delimiter=",", dtype=str, skip_header=1)
    assert sum(row[0].startswith("theta") for row in table) == 2 * 71
    written = write_report(fits, out=tmp_path / "chosen", var_names=["mu", "tau"])
    assert {"marginals", "trace"} <= set(written)


def test_a_report_of_an_observed_site_without_a_plate(tmp_path):
    """One observed event: PSIS-LOO has a single term, so no k-hat figure; the rest stands."""
    data = {"y": torch.tensor(np.random.default_rng(2).normal(1.0, 1.0, 20),
                              dtype=torch.float32)}
    svi = infer(mean_without_plate, data, method="svi", steps=300, progress=False)
    nuts = infer(mean_without_plate, data, **NUTS)
    written = write_report(svi, nuts, out=tmp_path)
    _read(written)
    assert {"ppc", "trace", "elbo"} <= set(written) and "loo_khat" not in written
