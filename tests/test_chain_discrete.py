"""Hidden states drawn by forward filtering, backward sampling follow p(z | x, theta).

Truth: every joint configuration of the hidden states is enumerated here by brute force
(K^T of them), its log p(z, x | theta) written out in NumPy from the story's definition,
and the exact marginal of each state and of each pair of neighbours read off. Each story
is evaluated at one parameter value repeated N = 20000 times; a share of draws is a
binomial mean with Monte Carlo sd sqrt(p (1 - p) / N) <= 0.0036, and each is held to 5 of
those (floor 1e-3): about 100 comparisons per story, each failing by chance with
probability below 1e-6.
"""

import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import model
from ppl_notes.evaluation import choose_path, story_facts
from ppl_notes.evaluation import draws as draws_module
from ppl_notes.evaluation.chain_discrete import NotAChain, chain_of
from ppl_notes.evaluation.density import trace_with
from ppl_notes.evaluation.draws import evaluate_draws, posterior_of

N = 20_000
Y = torch.tensor([0.1, 2.2, 1.9, -0.4, 3.1], dtype=torch.float64)
LOCS = np.array([0.0, 1.5, 3.0])
TRANSITION = np.array([[0.7, 0.2, 0.1], [0.15, 0.7, 0.15], [0.3, 0.1, 0.6]])
START = np.array([0.5, 0.3, 0.2])


@model(observed="y", data={"y": Y})
def hmm(y):
    """A user's HMM: a Python loop under pyro.markov, states indexing their parameters."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(3, dtype=y.dtype), 3.0).to_event(1))
    transition = pyro.sample("transition",
                             dist.Dirichlet(torch.ones(3, 3, dtype=y.dtype)).to_event(1))
    state = pyro.sample("z_0", dist.Categorical(torch.tensor(START, dtype=y.dtype)))
    pyro.sample("y_0", dist.Normal(locs[state], 1.0), obs=y[0])
    for t in pyro.markov(range(1, len(y))):
        state = pyro.sample(f"z_{t}", dist.Categorical(transition[state]))
        pyro.sample(f"y_{t}", dist.Normal(locs[state], 1.0), obs=y[t])


@model(observed="y", data={"y": torch.stack([Y, Y.flip(0) - 0.5])})
def sequences(y):
    """Two independent sequences in a plate, each an HMM, and a global state's effect."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(3, dtype=y.dtype), 3.0).to_event(1))
    transition = pyro.sample("transition",
                             dist.Dirichlet(torch.ones(3, 3, dtype=y.dtype)).to_event(1))
    with pyro.plate("sequences", y.shape[0], dim=-1):
        state = pyro.sample("z_0", dist.Categorical(torch.tensor(START, dtype=y.dtype)))
        pyro.sample("y_0", dist.Normal(locs[state], 1.0), obs=y[:, 0])
        for t in pyro.markov(range(1, y.shape[1])):
            state = pyro.sample(f"z_{t}", dist.Categorical(transition[state]))
            pyro.sample(f"y_{t}", dist.Normal(locs[state], 1.0), obs=y[:, t])


X = torch.tensor([[0.2, -0.3, 0.5], [1.4, 1.8, 1.1], [2.9, 3.3, 2.5], [1.6, 1.2, 1.9]],
                 dtype=torch.float64)


@model(observed="x", data={"x": X})
def global_states(x):
    """A chain of global states, each seen through a plate of three observations."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(3, dtype=x.dtype), 3.0).to_event(1))
    transition = pyro.sample("transition",
                             dist.Dirichlet(torch.ones(3, 3, dtype=x.dtype)).to_event(1))
    state = None
    for t in pyro.markov(range(x.shape[0])):
        probs = torch.tensor(START, dtype=x.dtype) if state is None else transition[state]
        state = pyro.sample(f"z_{t}", dist.Categorical(probs))
        with pyro.plate(f"seen_{t}", x.shape[1]):
            pyro.sample(f"x_{t}", dist.Normal(locs[state], 1.0), obs=x[t])


@model(observed="y", data={"y": Y[:4]})
def factorial(y):
    """Two chains that meet in every observation: not a chain (infer_discrete draws it)."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=y.dtype), 3.0).to_event(1))
    stay = pyro.sample("stay", dist.Beta(torch.tensor(2.0, dtype=y.dtype), 2.0))
    z = w = None
    for t in pyro.markov(range(len(y))):
        half = torch.tensor(0.5, dtype=y.dtype)
        z = pyro.sample(f"z_{t}", dist.Bernoulli(half if z is None else
                                                  torch.where(z > 0, stay, 1 - stay)))
        w = pyro.sample(f"w_{t}", dist.Bernoulli(half if w is None else
                                                  torch.where(w > 0, stay, 1 - stay)))
        pyro.sample(f"y_{t}", dist.Normal(locs[0] * z + locs[1] * w, 1.0), obs=y[t])


def _normal(x, loc):
    return -0.5 * (x - loc) ** 2 - 0.5 * np.log(2 * np.pi)


def _hmm_exact(y: np.ndarray, emission=None):
    """Marginals of each state and neighbour pair, by enumerating all K^T sequences."""
    emission = emission or (lambda t, k: _normal(y[t], LOCS[k]))
    states = list(itertools.product(range(3), repeat=len(y)))
    log_joint = np.array([np.log(START[s[0]]) + sum(np.log(TRANSITION[a, b])
                                                    for a, b in itertools.pairwise(s))
                          + sum(emission(t, k) for t, k in enumerate(s)) for s in states])
    weights = np.exp(log_joint - log_joint.max())
    weights /= weights.sum()
    states = np.array(states)
    single = np.stack([[weights[states[:, t] == k].sum() for k in range(3)]
                       for t in range(len(y))])
    pairs = np.stack([[[weights[(states[:, t] == a) & (states[:, t + 1] == b)].sum()
                        for b in range(3)] for a in range(3)] for t in range(len(y) - 1)])
    return single, pairs


def _shares(drawn: np.ndarray):
    single = np.stack([(drawn == k).mean(0) for k in range(3)], -1)
    pairs = np.stack([[((drawn[:, :-1] == a) & (drawn[:, 1:] == b)).mean(0) for b in range(3)]
                      for a in range(3)])
    return single, np.moveaxis(pairs, -1, 0)


def _close(got, exact):
    sd = np.sqrt(exact * (1 - exact) / N)
    assert np.all(np.abs(got - exact) <= 5 * np.maximum(sd, 1e-3)), (got, exact)


def _draws(story, data, names, seed=0):
    facts = story_facts(story, data)
    choose_path(story, data, facts)
    values = {"locs": torch.tensor(LOCS[:facts.value_shapes["locs"][0]]).expand(N, -1),
              "transition": torch.tensor(TRANSITION).expand(N, 3, 3)}
    if "stay" in facts.continuous:
        values = {"locs": torch.tensor([1.0, 2.5]).expand(N, 2),
                  "stay": torch.full((N,), 0.8, dtype=torch.float64)}
    if story is not factorial:  # drawn by forward filtering itself, not a fallback
        trace, _, _ = trace_with(story, data, facts, {k: v[0] for k, v in values.items()},
                                 False)
        one = chain_of(trace, facts.discrete, facts.plate_nesting).draw()
        assert all(one[n].numel() == np.prod(facts.value_shapes[n], dtype=int) for n in one)
    drawn, _ = posterior_of(story, data, values, facts, recover_discrete=True, seed=seed)
    return facts, np.stack([drawn[n] for n in names], axis=1)


def test_an_hmms_states_follow_their_exact_posterior():
    facts, drawn = _draws(hmm, {"y": Y}, [f"z_{t}" for t in range(len(Y))])
    assert facts.path == "vmap"
    single, pairs = _hmm_exact(Y.numpy())
    got_single, got_pairs = _shares(drawn)
    _close(got_single, single)
    _close(got_pairs, pairs)


def test_chains_in_a_plate_are_drawn_sequence_by_sequence():
    y = torch.stack([Y, Y.flip(0) - 0.5])
    _, drawn = _draws(sequences, {"y": y}, [f"z_{t}" for t in range(y.shape[1])])
    assert drawn.shape == (N, y.shape[1], 2)  # (draws, time, sequence)
    for s in range(2):
        single, pairs = _hmm_exact(y[s].numpy())
        got_single, got_pairs = _shares(drawn[:, :, s])
        _close(got_single, single)
        _close(got_pairs, pairs)


def test_a_global_chain_seen_through_plates_sums_each_plate():
    x = X.numpy()
    _, drawn = _draws(global_states, {"x": X}, [f"z_{t}" for t in range(len(x))])
    single, pairs = _hmm_exact(x, lambda t, k: _normal(x[t], LOCS[k]).sum())
    got_single, got_pairs = _shares(drawn)
    _close(got_single, single)
    _close(got_pairs, pairs)


def test_two_chains_that_meet_are_left_to_infer_discrete_and_still_exact():
    data = {"y": Y[:4]}
    facts = story_facts(factorial, data)
    choose_path(factorial, data, facts)
    one = {"locs": torch.tensor([1.0, 2.5], dtype=torch.float64),
           "stay": torch.tensor(0.8, dtype=torch.float64)}
    trace, _, _ = trace_with(factorial, data, facts, one, False)
    with pytest.raises(NotAChain, match="not neighbours"):
        chain_of(trace, facts.discrete, facts.plate_nesting)
    names = [f"{c}_{t}" for t in range(4) for c in "zw"]
    _, drawn = _draws(factorial, data, names)
    configurations = np.array(list(itertools.product((0, 1), repeat=8)))
    y = Y[:4].numpy()
    log_joint = np.zeros(len(configurations))
    for i, c in enumerate(configurations):
        z, w = c[0::2], c[1::2]
        for chain in (z, w):
            log_joint[i] += np.log(0.5) + sum(np.log(0.8 if a == b else 0.2)
                                              for a, b in itertools.pairwise(chain))
        log_joint[i] += _normal(y, 1.0 * z + 2.5 * w).sum()
    weights = np.exp(log_joint - log_joint.max())
    weights /= weights.sum()
    exact = np.array([weights[configurations[:, j] == 1].sum() for j in range(8)])
    _close(drawn.mean(0), exact)


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_the_evaluation_draws_a_chains_states_in_its_own_run(path, monkeypatch):
    """posterior_of: the states come from the evaluation's run, no run of their own."""
    data = {"y": Y}
    facts = story_facts(hmm, data)
    choose_path(hmm, data, facts)
    facts.path = path
    count = N if path == "vmap" else 2000  # one run per draw on the loop path
    values = {"locs": torch.tensor(LOCS).expand(count, -1),
              "transition": torch.tensor(TRANSITION).expand(count, 3, 3)}

    def no_run_of_their_own(*args, **kwargs):
        raise AssertionError("the states were recovered by a run of their own")

    monkeypatch.setattr(draws_module, "recover_discrete_sites", no_run_of_their_own)
    posterior, _ = posterior_of(hmm, data, values, facts, recover_discrete=True, seed=1)
    drawn = np.stack([posterior[f"z_{t}"] for t in range(len(Y))], axis=1)
    single, pairs = _hmm_exact(Y.numpy())
    got_single, got_pairs = _shares(drawn)
    sd = np.sqrt(single * (1 - single) / count)
    assert np.all(np.abs(got_single - single) <= 5 * np.maximum(sd, 1e-3))
    sd = np.sqrt(pairs * (1 - pairs) / count)
    assert np.all(np.abs(got_pairs - pairs) <= 5 * np.maximum(sd, 1e-3))


def test_same_run_leaves_other_structures_to_the_caller():
    data = {"y": Y[:4]}
    facts = story_facts(factorial, data)
    choose_path(factorial, data, facts)
    values = {"locs": torch.tensor([1.0, 2.5]).expand(50, 2),
              "stay": torch.full((50,), 0.8, dtype=torch.float64)}
    evaluation = evaluate_draws(factorial, data, values, facts, recover_discrete="same_run")
    assert evaluation.discrete == {}
    evaluation = evaluate_draws(factorial, data, values, facts, recover_discrete=True)
    assert set(evaluation.discrete) == set(facts.discrete)


@model(observed="y", data={"y": Y[:3]})
def many_states(y):
    """Ten states, more than are summed value by value: torch's own reductions."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(10, dtype=y.dtype), 3.0).to_event(1))
    grid = torch.arange(10.0, dtype=y.dtype)
    transition = torch.softmax(-((grid[None, :] - grid[:, None]) ** 2), -1)
    state = None
    for t in pyro.markov(range(len(y))):
        probs = torch.full((10,), 0.1, dtype=y.dtype) if state is None else transition[state]
        state = pyro.sample(f"z_{t}", dist.Categorical(probs))
        pyro.sample(f"y_{t}", dist.Normal(locs[state], 1.0), obs=y[t])


TONES = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
                      [[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)


@model(observed="sequences", data={"sequences": TONES})
def tones(sequences):
    """Pyro's HMM example (model_1) as its tutorial writes it: sequences in a sequential
    plate, one chain after another in the run, each state seen through a plate of tones."""
    hidden, tone_count = 2, sequences.shape[-1]
    probs_x = pyro.sample("probs_x", dist.Dirichlet(
        0.9 * torch.eye(hidden, dtype=sequences.dtype) + 0.1).to_event(1))
    probs_y = pyro.sample("probs_y", dist.Beta(
        torch.tensor(0.1, dtype=sequences.dtype), 0.9).expand([hidden, tone_count]).to_event(2))
    tones_plate = pyro.plate("tones", tone_count, dim=-1)
    for i in pyro.plate("sequence_loop", len(sequences)):
        x = 0
        for t in pyro.markov(range(sequences.shape[1])):
            x = pyro.sample(f"x_{i}_{t}", dist.Categorical(probs_x[x]),
                            infer={"enumerate": "parallel"})
            with tones_plate:
                pyro.sample(f"y_{i}_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]),
                            obs=sequences[i, t])


@pytest.mark.parametrize("story", [hmm, sequences, global_states, many_states, tones],
                         ids=lambda s: s.name)
def test_the_log_marginal_equals_pyros_generic_contraction(story):
    """Truth: Pyro's TraceEinsumEvaluator (tensor variable elimination) on the same run."""
    from pyro.infer.mcmc.util import TraceEinsumEvaluator

    from ppl_notes.evaluation.chain_discrete import UNROLLED_STATES, chain_of

    data = story.prepare_data(None)
    facts = story_facts(story, data)
    if story is tones:
        one = {"probs_x": torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64),
               "probs_y": torch.tensor([[0.9, 0.2], [0.1, 0.6]], dtype=torch.float64)}
    else:
        one = {"locs": torch.linspace(-1.0, 3.0, facts.value_shapes["locs"][0],
                                      dtype=torch.float64)}
    if "transition" in facts.continuous:
        one["transition"] = torch.tensor(TRANSITION)
    trace, _, _ = trace_with(story, data, facts, one, False)
    truth = TraceEinsumEvaluator(trace, True, facts.plate_nesting).log_prob(trace)
    got = chain_of(trace, facts.discrete, facts.plate_nesting).log_marginal()
    assert float(got) == pytest.approx(float(truth), rel=1e-12, abs=1e-10)
    assert (story is many_states) == (story is not tones
                                      and facts.value_shapes["locs"][0] > UNROLLED_STATES)


def _draws_many(data):
    facts = story_facts(many_states, data)
    choose_path(many_states, data, facts)
    values = {"locs": torch.linspace(-1.0, 3.0, 10, dtype=torch.float64).expand(N, -1)}
    drawn, _ = posterior_of(many_states, data, values, facts, recover_discrete=True, seed=0)
    return facts, np.stack([drawn[f"z_{t}"] for t in range(3)], axis=1)


def test_ten_states_are_drawn_from_their_exact_posterior():
    y = Y[:3].numpy()
    locs = np.linspace(-1.0, 3.0, 10)
    grid = np.arange(10.0)
    configurations = np.array(list(itertools.product(range(10), repeat=3)))
    log_joint = np.full(len(configurations), np.log(0.1))
    for t in range(3):
        log_joint += _normal(y[t], locs[configurations[:, t]])
        if t:
            previous = configurations[:, t - 1]
            logits = -((grid[None, :] - previous[:, None]) ** 2)
            log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            log_joint += log_probs[np.arange(len(configurations)), configurations[:, t]]
    weights = np.exp(log_joint - log_joint.max())
    weights /= weights.sum()
    _, drawn = _draws_many({"y": Y[:3]})
    for t in range(3):
        exact = np.array([weights[configurations[:, t] == k].sum() for k in range(10)])
        _close(np.array([(drawn[:, t] == k).mean() for k in range(10)]), exact)


@model(observed=[f"y_{t}" for t in range(8)], dtype=torch.float32)
def hmm_float32(y):
    """A user's float32 HMM: float32 constants, no default data, a two-state switch."""
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    stay = pyro.sample("stay", dist.Beta(2.0, 2.0))
    switch = torch.stack([torch.stack([stay, 1 - stay]), torch.stack([1 - stay, stay])])
    z = pyro.sample("z_0", dist.Categorical(torch.tensor([0.5, 0.5])),
                    infer={"enumerate": "parallel"})
    pyro.sample("y_0", dist.Normal(locs[z], 1.0), obs=y[0])
    for t in pyro.markov(range(1, len(y))):
        z = pyro.sample(f"z_{t}", dist.Categorical(switch[z]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(locs[z], 1.0), obs=y[t])


def test_a_float32_chain_keeps_its_tape():
    """The tape runs in double and rounds each operation to float32; at this story's
    prior check points the gradient differed from eager float32 by 4.8e-7 at 0.44 (4
    ulps), which the check against the story accepts for float32 (64 ulps): the
    potential stays compiled, and the fit's draws are finite."""
    from ppl_notes import infer

    y = torch.tensor([0.1, 2.2, 1.9, -0.4, 3.1, 2.8, 0.2, 0.0])
    fit = infer(hmm_float32, {"y": y}, method="svi", progress=False)
    assert fit.info["compiler"] == "tape"
    assert np.isfinite(fit.draws("stay")).all() and set(np.unique(fit.draws("z_3"))) <= {0, 1}
