"""The flow family (issue 44): exact densities, escalation from the Gaussian, and its truth.

The flow's density is checked against autograd's Jacobian and its own inverse; the
escalation against a Gaussian posterior (which must stay on the Gaussian) and a banana
with a closed form: a ~ N(0, 1), b | a ~ N(a^2, 0.5^2), so E[b] = 1,
sd(b) = sqrt(Var(a^2) + 0.25) = 1.5, and log Z = log(pi) for the density written below.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_notes as pn
from ppl_notes.diagnostics import richer_guide
from ppl_notes.errors import OptionError
from ppl_notes.models import get_story
from ppl_notes.vi.escalation import escalation_wanted
from ppl_notes.vi.flow_family import FLOW_GUIDE, flows_from_gaussians
from ppl_notes.vi.flow_vi import fit_flows
from ppl_notes.vi.gaussian_family import Gaussian


def _gaussians(count, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tril = torch.tril(0.3 * torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        tril.diagonal().copy_(0.5 + torch.rand(dim, generator=generator, dtype=torch.float64))
        out.append(Gaussian("fullrank", torch.randn(dim, generator=generator,
                                                    dtype=torch.float64), tril=tril))
    return out


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_the_flow_density_is_exact_in_both_directions(dim):
    flows = flows_from_gaussians(_gaussians(3, dim), seed=1)
    with torch.no_grad():
        for parameter in flows.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    epsilon = torch.randn(3, 9, dim, dtype=torch.float64)
    points = flows.draw(epsilon)
    with torch.no_grad():
        _, log_det = flows._forward(epsilon, flows.layers)
    base = -0.5 * epsilon.pow(2).sum(-1) - 0.5 * dim * math.log(2 * math.pi)
    expected = base - log_det - flows._log_det_tril[:, None]
    torch.testing.assert_close(flows.log_prob(points), expected, rtol=0, atol=1e-10)

    def whole(e):  # restart 1's map from epsilon to z, for autograd's Jacobian
        batch = torch.zeros(3, 1, dim, dtype=torch.float64)
        batch = batch.index_copy(0, torch.tensor([1]), e.reshape(1, 1, dim))
        return flows._points(flows._forward(batch, flows.layers)[0])[1, 0]

    jacobian = torch.autograd.functional.jacobian(whole, epsilon[1, 0])
    log_det_z = torch.linalg.slogdet(jacobian)[1]
    assert float(log_det_z) == pytest.approx(float(log_det[1, 0] + flows._log_det_tril[1]),
                                             abs=1e-10)
    restart = flows.restart(2)
    torch.testing.assert_close(restart.log_prob(restart.draw(epsilon[2])),
                               flows.log_prob(points)[2], rtol=0, atol=1e-10)


def test_a_flow_starts_as_its_gaussian():
    qs = _gaussians(2, 4)
    flows = flows_from_gaussians(qs, seed=0)
    epsilon = torch.randn(2, 50, 4, dtype=torch.float64)
    for k, q in enumerate(qs):
        # the same density (the layers' permutations reorder i.i.d. normals: the draws
        # themselves differ), at the Gaussian's draws and at the flow's
        for points in (q.draw(epsilon[k]), flows.draw(epsilon)[k]):
            torch.testing.assert_close(flows.restart(k).log_prob(points), q.log_prob(points),
                                       rtol=0, atol=1e-10)


def test_fitting_a_flow_on_a_gaussian_potential_leaves_it_gaussian():
    """A standard normal potential: the ELBO's optimum is log Z = (d/2) log 2 pi exactly."""
    dim = 3
    flows = flows_from_gaussians([Gaussian("fullrank", torch.zeros(dim, dtype=torch.float64),
                                           tril=torch.eye(dim, dtype=torch.float64))], seed=0)

    def potential(z):
        return 0.5 * (z**2).sum(1), z

    (trace,) = fit_flows(potential, flows, seed=0, steps=200)
    log_z = 0.5 * dim * math.log(2 * math.pi)
    # STL: at the optimum every draw's ELBO term is log Z, so the noise vanishes
    assert np.nanmean(trace.elbo[-50:]) == pytest.approx(log_z, abs=1e-3)
    assert trace.settled and trace.evaluations == 200 * 32


@pn.model(observed=[])
def banana():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Normal(a**2, 0.5))


@pn.model(observed=[])
def banana_by_factor():
    """The same density, b's given by a factor: no site's location is a latent, so the
    centring (ppl_notes.vi.centring) has nothing to decentre and the flow is the answer."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.ImproperUniform(dist.constraints.real, (), ()))
    pyro.factor("b_given_a", dist.Normal(a**2, 0.5).log_prob(b))


@pytest.fixture(scope="module")
def banana_fits():
    return {guide: pn.infer(banana_by_factor, data={}, method="svi", guide=guide, seed=0,
                            progress=False)
            for guide in (None, "fullrank")}


def test_the_banana_written_as_a_location_lands_decentred():
    """b ~ N(a^2, 0.5) decentred is b = a^2 + 0.5 b~ with a, b~ independent N(0, 1): a
    Gaussian posterior, which the Gaussian fits exactly. Closed form: E[b] = 1, sd 1.5;
    4000 draws give an sd within about 3% (b's long tail), a mean within 0.05."""
    fit = pn.infer(banana, data={}, method="svi", seed=0, progress=False)
    assert fit.info["centring"]["kept"] and fit.info["centring"]["centredness"] == {"b": 0.0}
    assert fit.info["family"] == "fullrank"
    b = fit.draws("b")
    assert abs(b.mean() - 1.0) < 0.1 and abs(b.std() / 1.5 - 1) < 0.1
    assert abs(fit.draws("a").std() - 1.0) < 0.05


def test_default_svi_goes_on_to_a_flow_where_the_gaussian_misses(banana_fits):
    """On the banana the Gaussian's k-hat exceeds 0.7: default SVI fits the flow and keeps it.

    Against the closed form (E[a] = 0, sd 1; E[b] = 1, sd 1.5) the flow's sds are nearer
    the truth than the Gaussian's, which seeks a mode (a's sd about 0.5, b's about 0.5);
    with 4000 draws the Monte Carlo error of an sd is about 2% (and that of b's more, its
    tail being long), far below the gaps asserted. The flow does not land: b's sd was
    1.2-1.4 of 1.5 in the measurements of docs/vi.md.
    """
    flow, gaussian = banana_fits[None], banana_fits["fullrank"]
    escalation = flow.info["escalation"]
    assert escalation["to_flow"] and escalation["kept"]
    assert flow.info["family"] == "flow" and flow.tree.attrs["guide"] == FLOW_GUIDE
    assert escalation["flow_elbo"] > escalation["gaussian_elbo"] + 0.1
    assert gaussian.info["escalation"] == {
        "to_flow": False, "reason": "the family was named (guide=...): it is fitted as it is"}
    for fit in (flow, gaussian):
        assert abs(float(fit.draws("a").mean())) < 0.1
    flow_b, gaussian_b = float(flow.draws("b").std()), float(gaussian.draws("b").std())
    assert abs(flow_b / 1.5 - 1) < abs(gaussian_b / 1.5 - 1) - 0.2
    assert float(flow.draws("a").std()) > 0.8 > float(gaussian.draws("a").std())
    # the verdict says what was done, and the advice names what ppl_notes has
    verdict = flow.check()
    assert any("went on from its fullrank Gaussian to a flow" in p for p in verdict.holds)
    assert "guide='flow'" in richer_guide(gaussian.info)


def test_fresh_draws_from_a_flow_fit_are_refused_by_name(banana_fits):
    with pytest.raises(OptionError, match="guide='flow'"):
        banana_fits[None].log_evidence(num_samples=10)


def test_a_gaussian_posterior_stays_on_the_gaussian():
    fit = pn.infer(get_story("normal_mean").load_model(), method="svi", seed=0,
                   progress=False)
    assert fit.info["family"] == "fullrank"
    assert fit.info["escalation"]["to_flow"] is False
    assert "Gaussian" in fit.info["escalation"]["reason"]


def test_escalation_rules():
    class Fit:
        def __init__(self, khat, share):
            self.info = {"importance": {"khat": khat, "ess_share": share}}
            if len(khat) > 1:
                self.info["restarts"] = [{"restart": r, "pooled": True}
                                         for r in range(len(khat))]

    assert escalation_wanted("auto", Fit([0.9], [0.3]), 4)[0]
    # the median restart decides: one restart just over 0.7 is k-hat's own noise
    assert not escalation_wanted("auto", Fit([0.74, 0.61, 0.72, 0.63], [0.75, 0.76, 0.87, 0.82]),
                                 4)[0]
    assert escalation_wanted("auto", Fit([0.9, 0.68, 0.8, 0.79], [0.4] * 4), 4)[0]
    assert not escalation_wanted("auto", Fit([0.5], [0.6]), 4)[0]
    # far from the posterior though k-hat's tail fit calls the ratios tame
    assert escalation_wanted("auto", Fit([0.6, 0.7, 0.65, 0.62], [0.03, 0.15, 0.09, 0.05]),
                             4)[0]
    assert not escalation_wanted("auto", Fit([2.0], [0.99]), 4)[0]  # near-uniform weights
    assert not escalation_wanted("auto", Fit([0.9], [0.3]), 500)[0]  # above FLOW_MAX_DIM
    assert escalation_wanted("always", Fit([0.1], [0.99]), 500)[0]
    assert not escalation_wanted("never", Fit([3.0], [0.1]), 4)[0]
    for family, named in [("meanfield", "guide='fullrank'"), ("fullrank", "guide='flow'"),
                          ("flow", "method='nuts'"), (None, "AutoNormalizingFlow")]:
        assert named in richer_guide({"family": family})


def test_guide_flow_is_refused_in_pyros_loop():
    with pytest.raises(OptionError, match="guide='flow' is fitted on the story's potential"):
        pn.infer(banana, data={}, method="svi", guide="flow", optimizer="adam", progress=False)


@pn.model(observed=["y"])
def two_means(y=None):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 10.0).to_event(1))
    with pyro.plate("rows", 50):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


@pytest.mark.parametrize("flow", ["iaf", "bnaf"])
def test_a_users_flow_guide_runs_and_lands_on_the_closed_form(flow):
    """Pyro's flow guides as users write them. AutoIAFNormal: Pyro's JitTrace_ELBO fails
    its parameter check on it at the first gradient (its loss alone traces), so the fit
    runs uncompiled and says so, where it raised a raw AssertionError. A block
    autoregressive flow (AutoNormalizingFlow, BNAF) has a log density only at the draw it
    made last: its draws' log q are taken as each is drawn, where all were taken at the
    end and raised KeyError. Truth: mu | y ~ N(sum y / (n + 1/100), 1 / (n + 1/100)),
    sd 0.141; the IAF's 1000 draws within 0.3 of that sd of the mean (the flow's own
    error after 600 steps, not the draws'), the BNAF's within 1 sd (it had moved 0.6 sd
    of its 1.7 in 600 steps: its slow fit is BNAF's, not ppl_notes')."""
    from functools import partial

    from pyro.distributions.transforms import block_autoregressive
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow

    guide = (AutoIAFNormal(two_means) if flow == "iaf"
             else AutoNormalizingFlow(two_means, partial(block_autoregressive)))
    y = torch.randn(50, 2, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) + torch.tensor([1.0, -2.0], dtype=torch.float64)
    fit = pn.infer(two_means, data={"y": y}, method="svi", guide=guide,
                   steps=600, seed=0, progress=False)
    precision = 50 + 1 / 100
    mean, sd = (y.sum(0) / precision).numpy(), 1 / math.sqrt(precision)
    draws = fit.draws("mu").reshape(-1, 2)
    assert np.abs(draws.mean(0) - mean).max() < (0.3 if flow == "iaf" else 1.0) * sd
    assert fit.info["jit"] is False
    assert "k-hat" in str(fit.check())  # log q at every draw: PSIS can weigh them
