"""Interrupts keep what exists and say one line; progress is live; no stray warnings.

Ctrl-C is simulated where it lands (a KeyboardInterrupt raised by the code it would
interrupt); one test sends a real SIGINT to the command's process group.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import ppl_notes
import ppl_notes.mcmc.chains as chains_module
from ppl_notes import DiagnosticWarning, InferenceError, infer
from ppl_notes.cli import main
from ppl_notes.guides.conjugate import normal_mean_guide
from ppl_notes.models.conjugate import normal_mean

NUTS = dict(method="nuts", chains=2, warmup=100, draws=100, compiler="none", progress=False)


def test_ctrl_c_during_the_pools_shutdown_keeps_every_chain(monkeypatch):
    """Every chain has finished and sent its draws; a Ctrl-C while the pool joins its
    workers must not lose them."""
    from concurrent.futures import ProcessPoolExecutor

    original = ProcessPoolExecutor.shutdown
    landed = []

    def interrupted_shutdown(self, wait=True, *, cancel_futures=False):
        if wait and not landed:
            landed.append(True)
            raise KeyboardInterrupt
        return original(self, wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(ProcessPoolExecutor, "shutdown", interrupted_shutdown)
    fit = infer(normal_mean, processes=2, **NUTS)
    assert landed and not fit.partial
    assert fit.to_arviz()["posterior"].sizes == {"chain": 2, "draw": 100}


def test_ctrl_c_while_compiling_in_worker_processes_is_one_line(monkeypatch, capsys):
    original, landed = chains_module._drain, []

    def interrupted(progress_queue, bars):
        if not landed:  # lands before any worker reported a chain started
            landed.append(True)
            raise KeyboardInterrupt
        original(progress_queue, bars)

    monkeypatch.setattr(chains_module, "_drain", interrupted)
    code = main(["run", "normal_mean", "--method", "nuts", "--no-progress",
                 "--set", "processes=2", "--set", "compiler='none'"])
    err = capsys.readouterr().err.strip()
    assert code == 130
    assert err == "ppl-notes: interrupted (Ctrl-C) while compiling: no chain had started"


def test_ctrl_c_while_compiling_in_this_process_is_one_line(monkeypatch, capsys):
    def compiling(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chains_module, "BatchedPotential", compiling)
    code = main(["run", "normal_mean", "--method", "nuts", "--no-progress",
                 "--set", "processes=1"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "interrupted (Ctrl-C)" in err


def test_a_compare_interrupted_in_nuts_keeps_the_svi_result(monkeypatch, capsys, tmp_path):
    def compiling(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chains_module, "BatchedPotential", compiling)
    code = main(["compare", "normal_mean", "--no-progress", "--out", str(tmp_path),
                 "--svi", "steps=50", "--nuts", "processes=1"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and (tmp_path / "svi.nc").exists()
    assert err.splitlines()[-1].endswith(f"the SVI result is in {tmp_path / 'svi.nc'}")


def _interrupt_command(arguments: list[str], tmp_path, ready) -> tuple[int, str, str]:
    """Run ``ppl-notes ARGUMENTS`` in its own process group, send the group SIGINT (as a
    terminal does) once ``ready(stderr so far)`` holds, and return (code, stdout, stderr)."""
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ppl_notes.cli", *arguments], stdout=subprocess.PIPE,
            stderr=stderr_file, start_new_session=True, text=True,
            # the bars say when sampling runs; CI=true (as .ci/run sets it) silences them
            env={k: v for k, v in os.environ.items() if k != "CI"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ready(log.read_text()):
            time.sleep(0.5)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    return process.returncode, stdout, log.read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_a_real_ctrl_c_during_sampling_saves_the_partial_result(tmp_path):
    """SIGINT to the whole process group once sampling runs."""
    out = tmp_path / "partial.nc"
    code, stdout, stderr = _interrupt_command(
        ["run", "normal_mean", "--method", "nuts", "--out", str(out), "--set", "processes=2",
         "--set", "compiler='none'", "--set", "chains=2", "--set", "draws=200000"], tmp_path,
        # each chain is sampling: its bar says "NUTS chain c (sampling)"
        lambda log: all(f"NUTS chain {c} (sampling)" in log for c in (0, 1)))
    assert code == 0, stderr[-2000:]
    assert "PartialResultWarning: NUTS interrupted" in stderr and "Traceback" not in stderr
    assert out.exists() and f"saved to {out}" in stdout


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_a_real_ctrl_c_during_svi_restarts_keeps_every_restart(tmp_path):
    """The restarts run in worker processes; SIGINT reaches the whole group, the workers
    ignore it, and each restart returns the guide it has."""
    out = tmp_path / "partial.nc"
    started = time.monotonic()
    code, stdout, stderr = _interrupt_command(
        ["run", "normal_mean", "--method", "svi", "--out", str(out), "--set", "restarts=2",
         "--set", "processes=2", "--set", "steps=10000000", "--set", "stop='steps'",
         # Pyro's loop uncompiled: 1e7 steps would pick the compiled engine, whose inductor
         # build on two busy cores can outlast the wait (then no step is done at all)
         "--set", "engine='pyro'", "--set", "jit=False"], tmp_path,
        # no bar per restart: import, spawn two workers, and let both fit for a while
        lambda log: time.monotonic() - started > 25)
    assert code == 0, stderr[-2000:]
    assert "restarts interrupted: 2 of 2 fits came back, 2 of them" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert out.exists() and f"saved to {out}" in stdout
    saved = ppl_notes.load(out)
    assert saved.partial and saved.tree["posterior"].sizes["chain"] == 2
    assert all(0 < r["steps_done"] < 10_000_000 for r in saved.info["restarts"])


def test_progress_bars_show_compiling_then_live_warmup_and_sampling(monkeypatch):
    messages = []
    original = chains_module._Bars.put

    def spy(self, message):
        messages.append(message)
        original(self, message)

    monkeypatch.setattr(chains_module._Bars, "put", spy)
    infer(normal_mean, processes=1, **NUTS)
    chain0 = [what for chain, what in messages if chain == 0]
    phases = [w for w in chain0 if isinstance(w, str)]
    counts = [w for w in chain0 if isinstance(w, int)]
    assert phases == ["compiling", "warmup", "sampling"]
    assert counts == list(range(10, 201, 10))  # every 10 iterations, not only at the end
    assert chain0.index("sampling") == chain0.index(100) + 1


def test_no_cuda_remark_when_inductor_compiles():
    """In fresh processes: torch alone remarks on the missing CUDA runtime when inductor
    loads its C++ toolchain; after importing ppl_notes it does not."""
    def stderr_of(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stderr

    if "No CUDA runtime" not in stderr_of("import torch.utils.cpp_extension"):
        pytest.skip("torch says nothing here (a CUDA runtime is present)")
    assert "No CUDA runtime" not in stderr_of("import ppl_notes, torch.utils.cpp_extension")


def test_a_nan_loss_is_one_error_without_pyros_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InferenceError, match="at step 1"):
            infer(normal_mean, method="svi", guide=normal_mean_guide, steps=50,
                  learning_rate=1e6, engine="pyro", progress=False)
    assert not [w for w in caught if "Encountered NaN" in str(w.message)]


@pytest.mark.parametrize(("chains", "draws"), [(2, 1), (1, 1), (1, 3)])
def test_too_few_draws_give_one_project_warning_and_no_numpy_remarks(chains, draws):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = infer(normal_mean, chains=chains, draws=draws, processes=1,
                    **{k: v for k, v in NUTS.items() if k not in ("chains", "draws")})
        fit.summary()
    kinds = [(w.category, str(w.message)) for w in caught]
    assert [k for k in kinds if k[0] is RuntimeWarning] == []
    ours = [m for c, m in kinds if c is DiagnosticWarning]
    assert len(ours) == 1 and f"{draws} draw(s) per chain" in ours[0]
    assert torch.get_default_dtype() == torch.float32


def test_chain_workers_end_when_their_parent_is_killed_outright():
    """SIGKILL (a timeout, the OOM killer) gives the parent no chance to stop its pool:
    the workers must not sample on, orphaned."""
    import psutil

    script = ("from ppl_notes import infer\n"
              "from ppl_notes.models.conjugate import normal_mean\n"
              "infer(normal_mean, method='nuts', chains=2, processes=2, warmup=200000, "
              "draws=10, compiler='none', progress=False)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and len(workers) < 2:
            workers = [c for c in psutil.Process(parent.pid).children()
                       if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert len(workers) == 2
        time.sleep(3)  # the workers are importing, tracing, sampling
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_sigterm_during_the_report_keeps_both_results(tmp_path):
    """Issue 41 item 11: SIGTERM while compare wrote its report lost nuts.nc, saved after it.

    Each result is saved as soon as it exists; SIGTERM then ends the command as Ctrl-C
    does, with one line and no traceback.
    """
    from ppl_notes import load

    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ppl_notes.cli", "compare", "normal_mean", "--no-progress",
             "--out", str(out)], stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out / "parameters.csv").exists() \
                and process.poll() is None:
            time.sleep(0.05)
        assert (out / "nuts.nc").exists()  # saved before the report began
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    stderr = log.read_text()
    assert process.returncode in (0, 130), stderr[-2000:]  # 0: the report had just ended
    assert "Traceback" not in stderr
    if process.returncode == 130:
        assert "interrupted (SIGTERM)" in stderr.splitlines()[-1]
    for name in ("svi.nc", "nuts.nc"):
        assert load(out / name).num_draws > 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_sigterm_to_the_process_group_stops_nuts_workers_with_one_line(tmp_path):
    """GNU timeout and job schedulers send SIGTERM to the whole process group: the NUTS
    workers died of it and the main process printed a raw BrokenProcessPool. The workers
    now leave it to the main process, which keeps the draws made so far."""
    log = tmp_path / "stderr.txt"
    out = tmp_path / "fit.nc"
    with open(log, "w") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ppl_notes.cli", "run", "eight_schools", "--method", "nuts",
             "--no-progress", "--set", "processes=2", "--set", "warmup=5000000",
             "--out", str(out)],
            stdout=subprocess.PIPE, stderr=stderr_file, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            workers = []
            while time.monotonic() < deadline and process.poll() is None and len(workers) < 2:
                workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                         text=True).stdout.split()
                time.sleep(0.5)
            time.sleep(15)  # the workers record their tapes and start their chains
            assert process.poll() is None  # 5e6 warmup iterations: still running
            os.killpg(process.pid, signal.SIGTERM)  # the group, as timeout does
            process.communicate(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr, stderr[-2000:]
    assert "interrupted (SIGTERM)" in stderr
