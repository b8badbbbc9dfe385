"""The C NUTS transition against the Python one, and the sampler on either."""

import shutil

import numpy as np
import pytest

from ppl_notes.mcmc.driver import _python_transition, sample_chain
from ppl_notes.mcmc.metrics import LowRankMetric, Metric
from ppl_notes.native.trajectory import (
    NativeTransitions,
    SplitMix64,
    TransitionRequest,
    library,
)

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler here")


def test_splitmix64_is_the_published_generator():
    """The first outputs of Vigna's reference splitmix64.c from seed 1234567."""
    generator = SplitMix64(1234567)
    assert [generator.next_int() for _ in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423,
        4593380528125082431, 16408922859458223821]


def _target(dim: int, rng: np.random.Generator):
    """A Gaussian with random scales and correlations, and a funnel-like wall: the
    potential is infinite beyond |q_0| > 6, so long trajectories hit it (non-finite
    potentials, divergences, invalid subtrees)."""
    factor = rng.normal(size=(dim, dim)) * rng.uniform(0.1, 3.0, size=dim)
    precision = np.linalg.inv(factor @ factor.T + 0.1 * np.eye(dim))

    def potential(q):
        if abs(q[0]) > 6:
            return np.inf, np.full(dim, np.nan)
        return 0.5 * q @ precision @ q, precision @ q

    return potential


def _metrics(dim: int, rng: np.random.Generator):
    vectors = np.linalg.qr(rng.normal(size=(dim, 2)))[0]
    return {"diag": Metric(rng.uniform(0.2, 3.0, size=dim)),
            "dense": Metric(np.cov(rng.normal(size=(dim, 4 * dim)))),
            "lowrank": LowRankMetric(rng.uniform(0.5, 2.0, size=dim), vectors,
                                     np.array([30.0, 0.01]))}


def _python(request, potential):
    transition = _python_transition(request)
    position, steps = next(transition), 0
    try:
        while True:
            steps += 1
            position = transition.send(potential(position))
    except StopIteration as done:
        return done.value, steps


def _native(request, potential, engine):
    engine.begin(0, request)
    steps = 0
    while True:
        steps += 1
        value, grad = potential(engine.requests[0].copy())
        if engine.resume(np.array([value]), grad[None]):
            return engine.result(0), steps


@pytest.mark.parametrize("metric", ["diag", "dense", "lowrank"])
def test_the_c_transition_is_the_python_transition(metric):
    """Same momentum and seed: the same trajectory, the same decisions (depth, steps,
    divergence, the sampled point). Both round differently (numpy's dot products may
    use fused multiply-adds), so the floats agree to 1e-9, not bit for bit."""
    rng = np.random.default_rng(5)
    engine = NativeTransitions(library(), 1, 5, 10)
    divergent = deep = 0
    for _ in range(150):
        potential = _target(5, rng)
        q = rng.normal(size=5)
        value, grad = potential(q)
        request = TransitionRequest(q, value, grad, rng.normal(size=5) * 2,
                                    float(rng.uniform(0.05, 1.5)),
                                    int(rng.integers(0, 2**63)), _metrics(5, rng)[metric], 10)
        python, python_calls = _python(request, potential)
        native, native_calls = _native(request, potential, engine)
        assert native_calls == python_calls
        assert (native.num_steps, native.tree_depth, native.diverging) == (
            python.num_steps, python.tree_depth, python.diverging)
        np.testing.assert_allclose(native.position, python.position, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(native.grad, python.grad, rtol=1e-9, atol=1e-12)
        for name in ("potential", "accept_prob", "energy"):
            assert getattr(native, name) == pytest.approx(getattr(python, name), rel=1e-9)
        divergent += native.diverging
        deep += native.tree_depth >= 4
    engine.close()
    assert divergent >= 5 and deep >= 5  # both kinds of tree were exercised


COVARIANCE = np.array([[1.0, 0.9 * 3.0], [0.9 * 3.0, 9.0]])
PRECISION = np.linalg.inv(COVARIANCE)


@pytest.mark.parametrize("native", [True, False])
def test_either_engine_samples_a_correlated_gaussian(native):
    """Moments within 5 standard errors at an ESS of at least 1000, on either engine."""
    result = sample_chain(lambda q: (0.5 * q @ PRECISION @ q, PRECISION @ q),
                          np.array([2.0, -2.0]), native=native, num_warmup=1000,
                          num_draws=5000, seed=3)
    draws = result.positions
    standard_error = np.sqrt(np.diag(COVARIANCE) / 1000)
    assert np.all(np.abs(draws.mean(0)) < 5 * standard_error)
    np.testing.assert_allclose(draws.std(0), np.sqrt(np.diag(COVARIANCE)),
                               rtol=5 / np.sqrt(2 * 1000))


def test_prebuild_compiles_both_native_libraries_into_an_empty_cache(tmp_path, monkeypatch):
    from ppl_notes.native import loader as _native
    from ppl_notes.native import tape as _tape
    from ppl_notes.native import trajectory as _trajectory

    monkeypatch.setenv("PPL_NOTES_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "packaged", lambda source: None)  # an install without them
    _native.prebuild(_tape.SOURCE, _trajectory.SOURCE)  # returns with both compilers running
    _native.wait_for_builds()
    built = sorted(path.name.split("-")[0] for path in tmp_path.glob("*.so"))
    assert built == ["tape", "trajectory"]
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no workspace left behind
    lib = _native.build(_tape.SOURCE, "potential tapes")  # loads what is there
    assert lib is not None and hasattr(lib, "tape_run")


def test_the_installed_libraries_load_without_a_compiler_and_only_for_their_source(
        tmp_path, monkeypatch):
    """pip install builds both libraries into the package (setup.py); nothing compiles then."""
    from ppl_notes.native import loader as _native
    from ppl_notes.native import tape as _tape
    from ppl_notes.native import trajectory as _trajectory

    for source in (_tape.SOURCE, _trajectory.SOURCE):
        if _native.packaged(source) is None:
            pytest.skip("this install has no built libraries (no compiler at install time)")
    monkeypatch.setenv("PPL_NOTES_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "compiler", lambda: None)
    assert _native.build(_tape.SOURCE, "potential tapes") is not None
    assert _native.build(_trajectory.SOURCE, "NUTS transitions") is not None
    assert not list(tmp_path.glob("*.so"))  # loaded from the package, not built
    edited = tmp_path / "tape.c"
    edited.write_text(_tape.SOURCE.read_text() + "\n/* edited */\n")
    assert _native.packaged_name(edited) != _native.packaged_name(_tape.SOURCE)
    monkeypatch.setenv("PPL_NOTES_NATIVE", "0")
    assert _native.packaged(_tape.SOURCE) is None and not _native.available(_tape.SOURCE)


def test_the_build_cache_is_keyed_by_machine_compiler_and_torch(tmp_path, monkeypatch):
    """A cache shared between machines never loads a library built for another (issue 29)."""
    import platform

    from ppl_notes.native import loader as _native
    from ppl_notes.native import tape as _tape

    compiler = shutil.which("cc") or shutil.which("gcc")
    before = _native.build_key(_tape.SOURCE, compiler)
    assert _native.build_key(_tape.SOURCE, compiler) == before  # stable in one setting
    assert _native.compiler_identity(compiler) != compiler  # the compiler said who it is
    for target, attribute, other in ((platform, "machine", lambda: "riscv64"),
                                     (_native.torch, "__version__", "0.0.1"),
                                     (_native.sys, "platform", "win32")):
        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, other)
            assert _native.build_key(_tape.SOURCE, compiler) != before, attribute
    with monkeypatch.context() as patch:
        patch.setattr(_native, "compiler_identity", lambda cc: f"{cc}: clang version 99")
        assert _native.build_key(_tape.SOURCE, compiler) != before


def test_a_compiler_that_refuses_the_vectoriser_flag_builds_without_it(tmp_path, monkeypatch):
    import shutil

    from ppl_notes.native import loader as _native
    from ppl_notes.native import trajectory as _trajectory

    real = shutil.which("cc") or shutil.which("gcc")
    wrapper = tmp_path / "strict-cc"
    wrapper.write_text("#!/bin/sh\nfor a in \"$@\"; do case $a in -fvect-cost-model*) "
                       "echo \"unknown argument: $a\" >&2; exit 1;; esac; done\n"
                       f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("PPL_NOTES_CACHE", str(tmp_path / "cache"))
    lib = _native.build(_trajectory.SOURCE, "NUTS transitions")
    assert lib is not None and len(list((tmp_path / "cache").glob("*.so"))) == 1
