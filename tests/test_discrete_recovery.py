"""The discrete sites recovered at each posterior draw follow p(z | x, theta) exactly.

Truth: for a two-component mixture, p(z_i = k | x, theta) = w_k N(x_i | mu_k, 1) /
sum_j w_j N(x_i | mu_j, 1), computed here in closed form. Each of three parameter draws
is repeated 3000 times; the share of draws that put observation i in component 1 is a
binomial mean, whose Monte Carlo sd is sqrt(p (1 - p) / 3000) <= 0.0092. Both recovery
routes are held to it: the one-softmax-per-observation draw for discrete sites local to
the observations (the plate path), and Pyro's infer_discrete (the vmap path).
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex

from ppl_notes import model
from ppl_notes.evaluation import choose_path, story_facts
from ppl_notes.evaluation.draws import posterior_of

X = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 2.5, 4.0], dtype=torch.float64)
REPEATS = 3000
THETAS = [((0.3, 0.7), (-1.0, 1.5)), ((0.5, 0.5), (0.0, 0.5)), ((0.8, 0.2), (-2.0, 3.0))]


@model(observed="x", data={"x": X})
def mixture(x):
    """A user's two-component mixture, written batch-aware (``Vindex``)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=x.dtype)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=x.dtype), 5.0).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(Vindex(locs)[..., z], 1.0), obs=x)


def _exact() -> np.ndarray:
    rows = []
    for weights, locs in THETAS:
        log = (torch.log(torch.tensor(weights, dtype=torch.float64))[:, None]
               + dist.Normal(torch.tensor(locs, dtype=torch.float64)[:, None], 1.0).log_prob(X))
        rows.append(torch.softmax(log, 0)[1].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("path", ["plate", "vmap"])
def test_recovered_components_follow_their_exact_conditional(path):
    data = {"x": X}
    facts = story_facts(mixture, data)
    assert choose_path(mixture, data, facts) == "plate" and facts.local_discrete
    facts.path = path  # the route under test (the plate path takes the local softmax)
    draws = {
        "weights": torch.tensor([w for w, _ in THETAS], dtype=torch.float64),
        "locs": torch.tensor([m for _, m in THETAS], dtype=torch.float64),
    }
    draws = {k: v.repeat_interleave(REPEATS, 0) for k, v in draws.items()}
    posterior, _ = posterior_of(mixture, data, draws, facts, recover_discrete=True, seed=3)
    z = posterior["z"].reshape(len(THETAS), REPEATS, len(X))
    share = z.mean(1)
    exact = _exact()
    sd = np.sqrt(exact * (1 - exact) / REPEATS)
    assert np.all(np.abs(share - exact) <= 5 * np.maximum(sd, 1e-3)), (share, exact)
    assert set(np.unique(z)) <= {0, 1}
