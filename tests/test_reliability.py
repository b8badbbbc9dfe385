"""Reliability: every user mistake is named before inference, faults and Ctrl-C lose
nothing, checkpoints resume to the uninterrupted result, seeds reproduce."""

import math
import pickle
import shutil
import warnings

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from ppl_notes import (
    CheckpointError,
    DataError,
    DiagnosticWarning,
    InferenceError,
    ModelGuideMismatchError,
    OptionError,
    OptionTypeError,
    PartialResultWarning,
    PPLNotesError,
    StoryError,
    guide,
    infer,
    load,
    model,
)
from ppl_notes._result import RunResult
from ppl_notes.guides.conjugate import normal_mean_guide
from ppl_notes.inference import _require_finite_draws
from ppl_notes.models.conjugate import normal_mean
from ppl_notes.models.eight_schools import centered, load_eight_schools

X = [1.2, 0.4, 2.2, 1.9, 0.7]


@model(observed=())
def silent():
    """A story with no sample sites at all."""
    return torch.zeros(1)


@model(observed="x")
def forgets_x(x=None):
    """Declares x observed but never samples it."""
    pyro.sample("mu", dist.Normal(0.0, 1.0))


@model(observed="y")
def counts(y=None):
    """An unbounded discrete latent: mu ~ Normal(0, 1), k ~ Poisson(3); y ~ Normal(k + mu, 1)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    k = pyro.sample("k", dist.Poisson(3.0))
    with pyro.plate("data", y.shape[-1]):
        pyro.sample("y", dist.Normal(k + mu, 1.0), obs=y)


@guide(normal_mean)
def guide_without_mu(x=None, **_):
    pyro.param("unused", torch.tensor(0.0))


@guide(normal_mean)
def guide_with_extra_site(x=None, **_):
    pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("nu", dist.Normal(0.0, 1.0))


@guide(normal_mean)
def guide_of_wrong_shape(x=None, **_):
    pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@guide(normal_mean)
def guide_of_wrong_support(x=None, **_):
    pyro.sample("mu", dist.Gamma(2.0, 1.0))


@model(observed="y")
def poisson_counts(y):
    """Counts with a Gamma prior on their rate, as in Pyro's tutorials."""
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Poisson(rate), obs=y)


@model(observed="obs")
def coin(flips):
    """Bernoulli flips, observed under another name than their argument."""
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    with pyro.plate("flips", len(flips)):
        pyro.sample("obs", dist.Bernoulli(p), obs=flips)


@model(observed="y")
def scale_with_a_normal_prior(y):
    """A scale drawn from a Normal: negative half the time (the story's mistake)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


@model(observed="y")
def log_of_a_negative(y):
    """pyro.factor of log(mu - 5) with mu near 0: NaN at the start."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("penalty", torch.log(mu - 5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@guide(normal_mean)
def guide_starting_at_nan(x):
    loc = pyro.param("mu_loc", torch.tensor(math.nan))
    pyro.sample("mu", dist.Normal(loc, 1.0))


def _schools(**changes):
    data = load_eight_schools()
    data.update(changes)
    return data


# (story, data, keyword arguments, error class, the words the message must contain)
BAD_INPUT = {
    "nan in data": (normal_mean, {"x": [1.0, math.nan, 2.0]}, {}, DataError,
                    ["'x'", "1 NaN", "index [[1]]"]),
    "infinite data": (normal_mean, {"x": [1.0, math.inf, -math.inf]}, {}, DataError,
                      ["'x'", "2 NaN or infinite"]),
    "shape does not fit the plate": (centered, _schools(y=np.zeros(7)), {}, DataError,
                                     ["observed site 'y'", "(7,)", "(8,)",
                                      "plates ['schools']"]),
    "data that break the story": (centered, _schools(sigma=np.zeros((2, 3))), {}, DataError,
                                  ["data 'sigma' give Normal an invalid scale",
                                   "check the data"]),
    "data of a shape the story cannot use": (centered, _schools(sigma=np.ones((2, 3))), {},
                                             DataError, ["observed site 'y'", "(2, 3)"]),
    "observed data of the wrong shape": (normal_mean, {"x": np.zeros((5, 2))},
                                         {}, DataError, ["observed site 'x'", "(5, 2)"]),
    "non-numeric data": (normal_mean, {"x": ["a", "b"]}, {}, DataError, ["'x'", "numeric"]),
    "empty data": (normal_mean, {"x": []}, {}, DataError, ["'x'", "empty"]),
    "empty data frame": (normal_mean, pd.DataFrame({"x": []}), {}, DataError, ["no rows"]),
    "data for no site": (normal_mean, {"x": X, "z": X}, {}, DataError,
                         ["no site or argument 'z'", "keyword arguments are"]),
    "observed site without data": (normal_mean, {"num_obs": 5}, {}, DataError,
                                   ["observed site 'x' has no data"]),
    "unknown option": (normal_mean, None, {"step": 10}, OptionError,
                       ["no option 'step'", "did you mean 'steps'"]),
    "unknown method": (normal_mean, None, {"method": "gibbs"}, OptionError,
                       ["unknown method 'gibbs'"]),
    "no sample sites": (silent, {}, {}, StoryError, ["no pyro.sample sites"]),
    "observed site never sampled": (forgets_x, {"x": X}, {}, StoryError,
                                    ["declares 'x' observed", "never calls pyro.sample"]),
    "guide misses a site": (normal_mean, None, {"guide": guide_without_mu},
                            ModelGuideMismatchError, ["does not draw latent site 'mu'"]),
    "guide has an extra site": (normal_mean, None, {"guide": guide_with_extra_site},
                                ModelGuideMismatchError, ["samples 'nu'", "not a site"]),
    "guide of the wrong shape": (normal_mean, None, {"guide": guide_of_wrong_shape},
                                 ModelGuideMismatchError, ["site 'mu'", "shape (2,)"]),
    "guide of the wrong support": (normal_mean, None, {"guide": guide_of_wrong_support},
                                   ModelGuideMismatchError, ["site 'mu'", "support positive",
                                                             "support real"]),
    "steps <= 0": (normal_mean, None, {"steps": 0}, OptionError,
                   ["'steps' must be an integer >= 1, got 0"]),
    "chains < 1": (normal_mean, None, {"method": "nuts", "chains": 0}, OptionError,
                   ["'chains' must be an integer >= 1"]),
    "target_accept outside (0, 1)": (normal_mean, None, {"method": "nuts",
                                                         "target_accept": 1.5},
                                     OptionError, ["'target_accept'", "(0, 1)"]),
    "negative learning rate": (normal_mean, None, {"learning_rate": -0.1}, OptionError,
                               ["'learning_rate' must be a number > 0"]),
    "option of the wrong type": (normal_mean, None, {"steps": "100"}, OptionTypeError,
                                 ["'steps' must be int", "str '100'"]),
    "unbounded discrete latent under NUTS": (counts, {"y": X}, {"method": "nuts"}, StoryError,
                                             ["'k'", "infinite support", "Ways out",
                                              "marginal"]),
    "drop_incomplete of the wrong type": (normal_mean, None, {"drop_incomplete": "yes"},
                                          OptionTypeError, ["drop_incomplete"]),
    "a count of -1 under a Poisson": (poisson_counts, {"y": [1.0, 2.0, -1.0]}, {}, DataError,
                                      ["observed site 'y'", "-1.0 at element (2,)",
                                       "support of Poisson", "IntegerGreaterThan"]),
    "a flip of 2 under a Bernoulli": (coin, {"flips": [0, 1, 2, 1]}, {"method": "nuts"},
                                      DataError, ["observed site 'obs' (argument 'flips')",
                                                  "2.0 at element (2,)", "Bernoulli",
                                                  "Boolean"]),
    "a scale with a Normal prior": (scale_with_a_normal_prior, {"y": X}, {}, StoryError,
                                    ["Normal is given an invalid scale", "GreaterThan",
                                     "dist.Normal(mu, sigma)", "prior on its domain"]),
    "NaN at the start under NUTS": (log_of_a_negative, {"y": X}, {"method": "nuts"},
                                    StoryError, ["pyro.factor", "NaN",
                                                 "torch.log(mu - 5.0)"]),
    "a guide that starts at NaN": (normal_mean, None, {"guide": guide_starting_at_nan},
                                   ModelGuideMismatchError, ["guide 'guide_starting_at_nan'",
                                                             "invalid loc"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_named_before_inference(case, monkeypatch):
    from ppl_notes.inference import nuts
    from ppl_notes.vi import pyro_loop

    def started(*args, **kwargs):
        raise AssertionError(f"{case}: inference started before the mistake was named")

    monkeypatch.setattr(pyro_loop._Loop, "run", started)
    monkeypatch.setattr(nuts, "_run_fast", started)
    monkeypatch.setattr(nuts, "_run_pyro", started)
    story, data, kwargs, error, words = BAD_INPUT[case]
    kwargs = {"method": "svi", "progress": False, **kwargs}
    if kwargs["method"] == "svi":
        kwargs.setdefault("steps", 5)
    with pytest.raises(error) as caught:
        infer(story, data, **kwargs)
    assert isinstance(caught.value, PPLNotesError)
    for word in words:
        assert word in str(caught.value), (case, str(caught.value))


def test_every_error_is_also_the_matching_builtin():
    for error in (DataError, OptionError, StoryError, ModelGuideMismatchError, CheckpointError):
        assert issubclass(error, ValueError) and issubclass(error, PPLNotesError)
    assert issubclass(OptionTypeError, TypeError)
    assert issubclass(InferenceError, RuntimeError)


def test_incomplete_rows_are_dropped_only_on_request():
    frame = pd.DataFrame({"y": [28.0, np.nan, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
                          "sigma": [15.0, 10.0, 16.0, np.inf, 9.0, 11.0, 10.0, 18.0]})
    with pytest.raises(DataError, match="1 NaN"):
        infer(centered, frame, method="svi", steps=5, progress=False)
    fit = infer(centered, frame, method="svi", steps=5, progress=False, drop_incomplete=True)
    observed = fit.to_arviz()["observed_data"]["y"].values
    assert observed.tolist() == [28.0, -3.0, -1.0, 1.0, 18.0, 12.0]
    with pytest.raises(DataError, match="nothing is left"):
        infer(normal_mean, {"x": [math.nan, math.inf]}, drop_incomplete=True, progress=False)


# --- numerical faults ---------------------------------------------------------------


def _poisoned_guide(poison_at):
    """normal_mean's exact-family guide whose gradient turns NaN on call ``poison_at``.

    loc + sqrt(loc - loc) is loc going forwards, but its derivative is 1 + inf * 0 = NaN:
    a finite ELBO with a non-finite gradient.
    """
    calls = {"n": 0}

    @guide(normal_mean)
    def poisoned(x=None, **_):
        calls["n"] += 1
        loc = pyro.param("mu_loc", torch.tensor(0.0, dtype=torch.float64))
        scale = pyro.param("mu_scale", torch.tensor(1.0, dtype=torch.float64),
                           constraint=constraints.positive)
        if calls["n"] >= poison_at:
            loc = loc + torch.sqrt(loc - loc)
        pyro.sample("mu", dist.Normal(loc, scale))

    return poisoned


def test_a_nan_gradient_names_the_step_and_parameter_and_keeps_the_last_finite_state():
    """Call 1 is the pairing check, call 2 the draw-shape probe: step k is call k + 3."""
    poisoned = _poisoned_guide(poison_at=3 + 7)
    with pytest.raises(InferenceError) as caught:
        infer(normal_mean, {"x": X}, method="svi", guide=poisoned, steps=50, jit=False,
              progress=False)
    message = str(caught.value)
    assert "at step 7" in message and "gradients of ['mu_loc'] are not finite" in message
    store = pyro.get_param_store()
    fitted = float(store["mu_loc"].detach())
    reference = infer(normal_mean, {"x": X}, method="svi", guide=normal_mean_guide, steps=7,
                      jit=False, progress=False)
    assert fitted == float(reference.to_arviz()["fitted_params"]["mu_loc"])  # 7 finite steps


@model(observed="x")
def bounded(x=None):
    """p ~ Uniform(0, 1); x_i ~ Uniform(0, p): the density is 0 unless p > max(x)."""
    p = pyro.sample("p", dist.Uniform(torch.tensor(0.0, dtype=torch.float64), 1.0))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("x", dist.Uniform(torch.zeros_like(x), p), obs=x)


def test_nuts_that_cannot_start_names_the_site():
    """From the prior median p = 0.5, an observation of 0.9 has zero density."""
    with pytest.raises(InferenceError) as caught:
        infer(bounded, {"x": [0.9, 0.2]}, method="nuts", chains=1, warmup=10, draws=10,
              progress=False)
    assert "cannot start" in str(caught.value) and "['x']" in str(caught.value)
    assert "at the starting point p=" in str(caught.value)


@model(observed="y")
def stationary_ar(y):
    """As a user writes GARCH's constraint: b ~ Uniform(0, 1 - a), a bound that moves."""
    a = pyro.sample("a", dist.Uniform(0.0, 1.0))
    b = pyro.sample("b", dist.Uniform(0.0, 1.0 - a))
    with pyro.plate("t", y.shape[0]):
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)


@pytest.mark.parametrize("family", [None, "fullrank"])
def test_an_autoguide_on_a_moving_support_is_refused_before_any_step(family):
    """AutoNormal maps b into the support of its first trace; once a moves, b can leave
    its bound (posteriordb's GARCH failed so at step 15, "parameters became invalid").
    The site is now named before any step, and a guide that follows the bound runs."""
    y = torch.linspace(-1.0, 2.0, 20)
    with pytest.raises(StoryError) as caught:
        infer(stationary_ar, {"y": y}, method="svi", guide=family, optimizer="adam", steps=50,
              progress=False)
    message = str(caught.value)
    assert message.startswith("site 'b': its support depends on other latent sites")
    assert "NUTS and the default optimizer='newton' take such stories" in message
    # on the potential every draw is mapped with its own a's bound (as NUTS maps it)
    fit = infer(stationary_ar, {"y": y}, method="svi", guide=family, progress=False)
    a, b = fit.draws("a").reshape(-1), fit.draws("b").reshape(-1)
    assert ((b > 0) & (b < 1 - a)).all()

    def inside_the_bound(y):  # a guide that draws b within the bound its own a gives
        a_loc = pyro.param("a_loc", torch.tensor(0.0))
        b_loc = pyro.param("b_loc", torch.tensor(0.0))
        a = pyro.sample("a", dist.TransformedDistribution(
            dist.Normal(a_loc, 0.3), [dist.transforms.SigmoidTransform()]))
        pyro.sample("b", dist.TransformedDistribution(
            dist.Normal(b_loc, 0.3), [dist.transforms.SigmoidTransform(),
                                      dist.transforms.AffineTransform(0.0, 1.0 - a)]))

    fit = infer(stationary_ar, {"y": y}, method="svi", guide=inside_the_bound, steps=50,
                progress=False)
    assert fit.info["steps_done"] == 50


def test_a_posterior_with_nan_draws_is_an_error_not_a_result():
    run = RunResult(method="svi", sample_dims=("sample",),
                    posterior={"mu": np.array([0.1, np.nan, 0.3])})
    with pytest.raises(InferenceError, match=r"sites \['mu'\] \(mu: 1 values\)"):
        _require_finite_draws(run, normal_mean)


# --- interrupts -----------------------------------------------------------------------


def _interrupting_guide(at_call):
    calls = {"n": 0}

    @guide(normal_mean)
    def interrupting(x=None, **_):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        normal_mean_guide.fn(x=x)

    return interrupting


def test_ctrl_c_during_svi_returns_the_partial_posterior():
    with pytest.warns(PartialResultWarning, match="SVI interrupted at step 20 of 500"):
        fit = infer(normal_mean, {"x": X}, method="svi", guide=_interrupting_guide(3 + 20),
                    steps=500, jit=False, progress=False)
    assert fit.partial and "partial" in repr(fit)
    assert len(fit.history) == 20 and np.isfinite(fit.history["elbo"]).all()
    assert fit.draws("mu").shape == (1000,) and np.isfinite(fit.draws("mu")).all()


class _InterruptAfter:
    """Stands in for BatchedPotential: Ctrl-C arrives during potential call ``calls``;
    ``seen`` counts the calls of the last run."""

    seen = 0

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, *args, **kwargs):
        from ppl_notes.evaluation.potential import BatchedPotential

        limit, owner = self.calls, type(self)
        owner.seen = 0

        class Interrupting(BatchedPotential):
            def native(self):
                return None  # every evaluation through __call__, where it is counted

            def __call__(self, positions):
                owner.seen += 1
                if owner.seen == limit:
                    raise KeyboardInterrupt
                return super().__call__(positions)

        return Interrupting(*args, **kwargs)


def test_ctrl_c_during_nuts_returns_the_draws_every_chain_has(monkeypatch):
    import ppl_notes.mcmc.chains as chains_module

    options = dict(method="nuts", chains=2, warmup=100, draws=200, processes=1, progress=False)
    counter = _InterruptAfter(-1)
    monkeypatch.setattr(chains_module, "BatchedPotential", counter)
    full = infer(normal_mean, {"x": X}, **options)
    monkeypatch.setattr(chains_module, "BatchedPotential", _InterruptAfter(counter.seen * 3 // 4))
    with pytest.warns(PartialResultWarning, match="NUTS interrupted: the posterior holds"):
        fit = infer(normal_mean, {"x": X}, **options)
    draws = fit.to_arviz()["posterior"].sizes["draw"]
    assert fit.partial and 0 < draws < 200
    # the same seed: the partial draws are the first draws of the uninterrupted run
    np.testing.assert_array_equal(fit["mu"], full["mu"][:, :draws])


def test_ctrl_c_during_nuts_warmup_has_nothing_to_return(monkeypatch):
    import ppl_notes.mcmc.chains as chains_module

    monkeypatch.setattr(chains_module, "BatchedPotential", _InterruptAfter(20))
    with pytest.warns(PartialResultWarning, match="before any chain finished warmup"):
        with pytest.raises(KeyboardInterrupt):
            infer(normal_mean, {"x": X}, method="nuts", chains=2, warmup=100, draws=100,
                  processes=1, progress=False)


# --- checkpoints ----------------------------------------------------------------------


def _interrupt_loop_at(monkeypatch, step):
    """Ctrl-C between two steps of the SVI loop (whatever the engine compiles)."""
    from ppl_notes.vi import pyro_loop

    original = pyro_loop._Loop._one

    def one(step_fn, index):
        if index == step:
            raise KeyboardInterrupt
        return original(step_fn, index)

    monkeypatch.setattr(pyro_loop._Loop, "_one", staticmethod(one))


@pytest.mark.parametrize("engine", ["pyro", "fast"])
def test_resume_reaches_the_uninterrupted_result(tmp_path, monkeypatch, engine):
    """Interrupted at step 150 (checkpoints every 100 and at the interrupt), resumed to 300:
    the ELBO history, fitted parameters and draws equal those of one uninterrupted run."""
    options = dict(method="svi", guide=normal_mean_guide, steps=300, seed=3, engine=engine,
                   progress=False)
    whole = infer(normal_mean, **options)
    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as patch:
        _interrupt_loop_at(patch, 150)
        with pytest.warns(PartialResultWarning, match="resume with resume="):
            first = infer(normal_mean, checkpoint=str(path), checkpoint_every=100, **options)
    assert first.partial and len(first.history) == 150
    assert path.exists() and not (tmp_path / "run.ckpt.part").exists()
    resumed = infer(normal_mean, resume=str(path), **options)
    assert not resumed.partial
    np.testing.assert_array_equal(resumed.history["elbo"], whole.history["elbo"])
    for name in ("mu_loc", "mu_scale"):
        np.testing.assert_array_equal(resumed.to_arviz()["fitted_params"][name],
                                      whole.to_arviz()["fitted_params"][name])
    np.testing.assert_array_equal(resumed["mu"], whole["mu"])


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    infer(normal_mean, method="svi", steps=20, checkpoint=str(path), progress=False)
    with pytest.raises(CheckpointError, match="its seed is 0, this run's is 1"):
        infer(normal_mean, method="svi", steps=40, seed=1, resume=str(path), progress=False)
    with pytest.raises(CheckpointError, match="more than steps=10"):
        infer(normal_mean, method="svi", steps=10, resume=str(path), progress=False)


@model(observed="x")
def normal_mean_wider(x):
    """The conjugate normal-mean story with a wider prior: another objective."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


@guide(normal_mean)
def normal_mean_guide_narrow(x):
    """A guide with another starting scale: other code, so another run."""
    loc = pyro.param("mu_loc", torch.tensor(0.0))
    scale = pyro.param("mu_scale", torch.tensor(0.1), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


@pytest.mark.parametrize("engine", ["pyro", "fast"])
def test_resuming_with_other_data_story_guide_or_objective_names_what_changed(tmp_path, engine):
    """The checkpoint records digests of the story's and guide's code and of each data
    argument: a resume that differs in any of them is refused, and the error says which."""
    path = tmp_path / "run.ckpt"
    data = {"x": torch.tensor(X)}
    options = dict(method="svi", steps=40, engine=engine, progress=False)
    infer(normal_mean, data, guide=normal_mean_guide, steps=20, checkpoint=str(path),
          method="svi", engine=engine, progress=False)
    changed_data = {"x": torch.tensor([*X[:-1], 9.0])}
    with pytest.raises(CheckpointError, match=r"other data: argument\(s\) \['x'\]"):
        infer(normal_mean, changed_data, guide=normal_mean_guide, resume=str(path), **options)
    with pytest.raises(CheckpointError, match="another story"):
        infer(normal_mean_wider, data, resume=str(path), **options)
    with pytest.raises(CheckpointError, match="another guide"):
        infer(normal_mean, data, guide=normal_mean_guide_narrow, resume=str(path), **options)
    with pytest.raises(CheckpointError, match="learning_rate=0.01 there, 0.05 here"):
        infer(normal_mean, data, guide=normal_mean_guide, resume=str(path),
              learning_rate=0.05, **options)
    resumed = infer(normal_mean, data, guide=normal_mean_guide, resume=str(path), **options)
    assert len(resumed.history) == 40  # the same run does resume


def _rewrite_checkpoint(source, target, change):
    """A checkpoint whose payload was edited and re-hashed: valid bytes, wrong contents."""
    from ppl_notes.vi.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(source)
    change(state)
    save_checkpoint(target, {k: v for k, v in state.items() if k != "format"})
    return target


@pytest.mark.parametrize("engine", ["pyro", "fast"])
def test_a_checkpoint_missing_entries_or_of_other_shapes_is_a_named_error(tmp_path, engine):
    good = tmp_path / "good.ckpt"
    options = dict(method="svi", guide=normal_mean_guide, steps=40, engine=engine,
                   progress=False)
    infer(normal_mean, checkpoint=str(good), **{**options, "steps": 20})
    key = "params" if engine == "pyro" else "flat"

    def drop(state):
        del state[key]

    def reshape(state):
        if engine == "pyro":
            state["params"]["mu_loc"] = torch.zeros(3)
        else:
            state["flat"] = torch.zeros(5)

    missing = _rewrite_checkpoint(good, tmp_path / "missing.ckpt", drop)
    with pytest.raises(CheckpointError, match=rf"missing.ckpt.*lacks \['{key}'\]"):
        infer(normal_mean, resume=str(missing), **options)
    shaped = _rewrite_checkpoint(good, tmp_path / "shaped.ckpt", reshape)
    words = "'mu_loc' has shape \\(3,\\) there" if engine == "pyro" else "'flat' has shape \\(5,\\)"
    with pytest.raises(CheckpointError, match=rf"shaped.ckpt.*{words}"):
        infer(normal_mean, resume=str(shaped), **options)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_damaged_or_tampered_checkpoints_are_clear_errors(tmp_path):
    import io

    from ppl_notes._integrity import bytes_digest
    from ppl_notes._signing import sign, signing_key
    from ppl_notes.vi.checkpoint import FORMAT

    good = tmp_path / "good.ckpt"
    infer(normal_mean, method="svi", steps=20, checkpoint=str(good), progress=False)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = tmp_path / "code-ran"
    # a pickle that would run code, correctly hashed and even signed with the user's key
    # (the attacker stole it): weights_only refuses it all the same
    tampered = tmp_path / "tampered.ckpt"
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "params": _Exploit(str(marker))}, buffer)
    payload = buffer.getvalue()
    digest = bytes_digest(payload)
    tampered.write_bytes(f"{FORMAT}\n{digest}\n{sign(digest, signing_key())}\n".encode()
                         + payload)
    unsigned = tmp_path / "unsigned.ckpt"  # the same, signed without the key
    unsigned.write_bytes(f"{FORMAT}\n{digest}\n{'0' * 64}\n".encode() + payload)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(pickle.dumps("not a checkpoint") * 3)
    for path, words in ((truncated, "truncated.ckpt' is damaged or truncated"),
                        (tampered, "cannot be read safely"),
                        (unsigned, "not signed with your key"),
                        (foreign, "not a ppl_notes SVI checkpoint"),
                        (garbage, "not a ppl_notes SVI checkpoint"),
                        (tmp_path / "missing.ckpt", "no checkpoint at")):
        with pytest.raises(CheckpointError, match=words):
            infer(normal_mean, method="svi", steps=40, resume=str(path), progress=False)
    assert not marker.exists()  # nothing in the tampered file was executed


# --- reproducibility --------------------------------------------------------------------


def _heights_subset():
    from ppl_notes.data import load_galton_heights

    return {"height": np.asarray(load_galton_heights()["height"])[::6]}


REPRODUCIBLE = {
    "svi": (normal_mean, None, dict(steps=200), True),
    "nuts one chain": (normal_mean, None, dict(chains=1, warmup=100, draws=100), True),
    "nuts four chains": (normal_mean, None, dict(chains=4, warmup=100, draws=100), True),
    # two worker processes: each starts Python and torch (~10 s); no compilation needed
    "nuts two processes": (normal_mean, None, dict(chains=2, warmup=100, draws=100,
                                                   processes=2, compiler="none"), False),
    "nuts pyro engine": (normal_mean, None, dict(chains=1, warmup=50, draws=50,
                                                 engine="pyro"), True),
    "bbvi": (normal_mean, None, dict(steps=300), True),
    "map": (normal_mean, None, {}, False),
    "mle": (normal_mean, None, {}, False),
}


@pytest.mark.parametrize("case", sorted(REPRODUCIBLE))
def test_the_same_seed_gives_the_same_draws(case, tmp_path):
    story, data, options, stochastic = REPRODUCIBLE[case]
    method = case.split()[0]
    run = dict(method=method, progress=False, **options)
    first = infer(story, data, seed=11, **run)
    again = infer(story, data, seed=11, **run)
    np.testing.assert_array_equal(first["mu"], again["mu"])
    if stochastic:
        other = infer(story, data, seed=12, **run)
        assert not np.array_equal(first["mu"], other["mu"])
    saved = load(first.save(tmp_path / f"{method}.nc"))
    assert saved.to_arviz().identical(first.to_arviz())


def test_em_and_recovered_discrete_draws_reproduce():
    from ppl_notes.models.heights import model as heights

    data = _heights_subset()
    first = infer(heights, data, method="em", seed=4, progress=False)
    again = infer(heights, data, method="em", seed=4, progress=False)
    np.testing.assert_array_equal(first["gender"], again["gender"])
    np.testing.assert_array_equal(first["mu"], again["mu"])
    svi = [infer(heights, data, method="svi", steps=50, num_draws=20, seed=s, progress=False)
           for s in (4, 4, 5)]
    np.testing.assert_array_equal(svi[0]["gender"], svi[1]["gender"])
    assert not np.array_equal(svi[0]["gender"], svi[2]["gender"])


def test_checkpoint_files_are_removed_with_their_folder(tmp_path):
    """A sanity check of the atomic write: only the final file remains."""
    folder = tmp_path / "ckpts"
    infer(normal_mean, method="svi", steps=30, checkpoint=str(folder / "a.ckpt"),
          checkpoint_every=10, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["a.ckpt"]
    shutil.rmtree(folder)


# --- memory ------------------------------------------------------------------------------


def test_recovered_discrete_draws_are_compact_and_their_cost_is_said(caplog, monkeypatch):
    """Each person's gender for each draw: int8 (1 byte, not 8), a warning naming the ways
    out above a threshold, NUTS's thin= keeps every k-th draw, recover_discrete=False none."""
    from ppl_notes.evaluation import draws as _draws
    from ppl_notes.models.heights import model as heights

    data = _heights_subset()
    people = len(data["height"])
    monkeypatch.setattr(_draws, "DISCRETE_BYTES_TO_MENTION", 1000)
    with caplog.at_level("WARNING", logger="ppl_notes.evaluation.draws"):
        fit = infer(heights, data, method="nuts", chains=1, warmup=150, draws=100, thin=2,
                    progress=False)
    assert fit["gender"].dtype == np.int8 and fit["gender"].shape == (1, 50, people)
    assert _draws.discrete_cost(fit._facts, 50) == fit["gender"].nbytes
    assert "recover_discrete=False skips it" in caplog.text and "thin=" in caplog.text
    skipped = infer(heights, data, method="svi", steps=20, recover_discrete=False,
                    progress=False)
    assert "gender" not in skipped.to_arviz()["posterior"]


def test_ctrl_c_during_pyros_nuts_keeps_the_chains_it_has(monkeypatch):
    """engine='pyro': chains run one after another; Ctrl-C in the second keeps the first
    and the second's draws so far, cut to a common length."""
    from pyro.infer.mcmc import NUTS as PyroNUTS

    calls = {"n": 0}
    original = PyroNUTS.sample

    def sample(self, params):
        calls["n"] += 1
        if calls["n"] == 60 + 60 + 60 + 25:  # chain 1: warmup 60, then 25 draws
            raise KeyboardInterrupt
        return original(self, params)

    monkeypatch.setattr(PyroNUTS, "sample", sample)
    with pytest.warns(PartialResultWarning, match="2 chain\\(s\\) with the first 24 of 60"):
        fit = infer(normal_mean, {"x": X}, method="nuts", engine="pyro", chains=3, warmup=60,
                    draws=60, progress=False)
    assert fit.partial and fit["mu"].shape == (2, 24)
    assert np.isfinite(fit["mu"]).all()


@model(observed="y")
def sum_of_two_flat(y):
    """a + b is identified by the data, a - b by nothing: flat priors make it improper."""
    with pyro.poutine.mask(mask=False):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)


@model(observed="y")
def one_flat(y):
    """A flat prior on the mean of Normal data: proper (the posterior is N(ybar, 1/n))."""
    with pyro.poutine.mask(mask=False):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a, 1.0), obs=y)


def test_an_improper_posterior_under_svi_is_a_warning_naming_the_flat_direction():
    """The log joint of sum_of_two_flat is -sum (y - a - b)^2 / 2: its Hessian over (a, b)
    is -n [[1, 1], [1, 1]], eigenvalues -2n and 0, the zero along (a - b)/sqrt 2."""
    with pytest.warns(DiagnosticWarning, match=r"looks improper.*0\.71\*a - 0\.71\*b"):
        fit = infer(sum_of_two_flat, {"y": X}, method="svi", steps=200, progress=False)
    assert fit.info["flat_direction"]["largest"] == pytest.approx(2 * len(X), rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticWarning)
        proper = infer(one_flat, {"y": X}, method="svi", steps=1500, progress=False,
                       learning_rate=0.05)
    assert proper.info["flat_direction"] is None


@model(observed="y")
def correlation_through_cholesky(y):
    """rho gets a Normal prior; the Cholesky factor of [[1, rho], [rho, 1]] exists only
    for |rho| < 1, so torch raises outside. Stan rejects such proposals; so must NUTS."""
    rho = pyro.sample("rho", dist.Normal(0.0, 1.0))
    one = torch.ones(())
    covariance = torch.stack([torch.stack([one, rho]), torch.stack([rho, one])])
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(2),
                                                  scale_tril=torch.linalg.cholesky(covariance)),
                    obs=y)


def test_a_story_that_raises_at_some_points_is_rejected_there_not_crashed():
    rng = np.random.default_rng(0)
    y = rng.multivariate_normal([0, 0], [[1, 0.95], [0.95, 1]], size=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        fit = infer(correlation_through_cholesky, {"y": y}, method="nuts", chains=2,
                    warmup=300, draws=300, processes=1, compiler="none", progress=False)
    rho = fit["rho"]
    assert np.all(np.abs(rho) < 1) and 0.85 < rho.mean() < 0.99


@pytest.mark.parametrize("guide", ["fullrank", "meanfield"])
def test_an_improper_posterior_never_raises_a_raw_linear_algebra_error(guide):
    """The README's improper example at the sizes and seeds where it raised torch's
    ``LinAlgError``: the Newton step's covariance grows along the flat direction until
    its Cholesky factor fails. A shorter step is taken instead, and the fit ends with the
    warning that names the flat direction."""
    for size in (5, 6, 15, 30):
        for seed in (0, 1):
            y = np.random.default_rng(seed).normal(size=size)
            with pytest.warns(DiagnosticWarning, match=r"looks improper.*0\.71\*a - 0\.71\*b"):
                fit = infer(sum_of_two_flat, {"y": y}, method="svi", guide=guide, seed=seed,
                            progress=False)
            assert fit.info["flat_direction"] is not None
