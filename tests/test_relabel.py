"""Label switching: one mixture found under permuted labels is aligned before summaries
and comparisons (ppl_notes.relabel). The story is Pyro's GMM tutorial's, without an
ordering prior; truth: the data were drawn from components at -3 (30%) and +3 (70%)."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_notes
from ppl_notes import compare, infer
from ppl_notes.errors import DiagnosticWarning
from ppl_notes.relabel import align_chains

rng = np.random.default_rng(0)
DATA = torch.tensor(np.concatenate([rng.normal(-3, 1, 30), rng.normal(3, 1, 70)]))
K = 2


@ppl_notes.model(observed="obs", data={"data": DATA})
def gmm(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


QUICK = dict(method="nuts", chains=4, warmup=300, draws=300, init="sample", progress=False)


def test_align_chains_swaps_a_permuted_chain_back_and_maps_the_assignments():
    draws = np.random.default_rng(1).normal(size=(2, 50, 2)) * 0.1 + np.array([-3.0, 3.0])
    draws[1] = draws[1][:, ::-1]
    assignment = np.zeros((2, 50, 5), dtype=np.int64)
    assignment[1] = 1  # chain 1 calls the first unit's component "1"
    posterior = {"locs": draws.copy(), "assignment": assignment}
    components = {"size": 2, "sites": {"locs": 0}, "discrete": ["assignment"]}
    done = align_chains(posterior, components)
    assert done == ["chain 1: components [1, 0] -> [0, 1]"]
    assert np.all(posterior["locs"][..., 0] < 0) and np.all(posterior["locs"][..., 1] > 0)
    assert np.all(posterior["assignment"] == 0)
    assert align_chains(posterior, components) == []  # aligned chains are left alone


def test_nuts_chains_with_swapped_labels_are_aligned_with_a_warning():
    with pytest.warns(DiagnosticWarning, match="permuted labels"):
        fit = infer(gmm, seed=0, **QUICK)
    assert fit.info["relabelled"]  # seed 0: three of four chains came out swapped
    table = fit.summary()
    assert table.loc["locs[0]", "mean"] == pytest.approx(-3.0, abs=0.5)
    assert table.loc["locs[1]", "mean"] == pytest.approx(3.0, abs=0.5)
    assert table["r_hat"].max() < 1.02
    # the assignments follow: about 30% of units in the component at -3
    assert (fit.draws("assignment") == 0).mean() == pytest.approx(0.3, abs=0.05)


def test_compare_aligns_a_posterior_with_the_references_labels():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        first = infer(gmm, seed=0, **QUICK)
        # chain 0 picks its labels at random: take the first seed that found them the
        # other way round (each does with probability 1/2)
        sign = np.sign(first.draws("locs").mean(0)[0])
        for seed in range(1, 9):
            second = infer(gmm, seed=seed, **QUICK)
            if np.sign(second.draws("locs").mean(0)[0]) != sign:
                break
        else:
            pytest.fail("eight runs all found the labels of the first")
    with pytest.warns(DiagnosticWarning, match="relabelled to 'first'"):
        table = compare({"first": first, "second": second}, reference="first")
    # aligned: the same posterior twice, up to Monte Carlo error
    assert table.xs("second", level="posterior")["smd"].abs().max() < 0.3
