"""A child made by ``fork`` after fits in the parent fits too, with the parent's result.

GNU libgomp is not fork-safe: a child inherits the parent's OpenMP thread team without
its threads, and its first parallel region waited forever in the team's barrier (no
CPU, no error) after one SVI, NUTS or MAP fit in the parent on 2 intra-op threads.
``multiprocessing.Pool()`` forks on Linux, and so do test runners and many helpers.

The scenario runs in a fresh interpreter on torch's default threads (the suite's own
workers run on one thread, where the hang cannot happen): the parent makes an OpenMP
team on purpose (a large product on 2 threads), fits each method, and forks a child
that fits the same story with the same seed. Each child must finish within its
timeout with the parent's draws.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import multiprocessing, sys, warnings
    import torch, pyro, pyro.distributions as dist
    from ppl_notes import infer

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.randn(1500, 1500) @ torch.randn(1500, 1500)  # the parent's OpenMP team exists
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        200, generator=g, dtype=torch.float64)

    def regression(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)

    OPTIONS = {"svi": {}, "map": {}, "nuts": {"chains": 2, "warmup": 100, "draws": 100}}

    def fit(method):
        draws = infer(regression, {"X": X, "y": y}, method=method, seed=0, progress=False,
                      **OPTIONS[method]).draws("w")
        return draws.mean(0).tolist()

    def child(method, queue):
        queue.put(fit(method))

    if __name__ == "__main__":
        context = multiprocessing.get_context("fork")
        for method in OPTIONS:
            here = fit(method)
            assert torch.get_num_threads() == 2, "the caller's threads were not restored"
            queue = context.Queue()
            process = context.Process(target=child, args=(method, queue))
            process.start()
            process.join(120)
            if process.is_alive():
                process.kill()
                print(f"{method}: the forked child hung", flush=True)
                sys.exit(1)
            there = queue.get(timeout=10)
            assert there == here, (method, here, there)
            print(f"{method}: the child's fit equals the parent's", flush=True)
""")


def test_a_forked_child_fits_after_the_parent_fitted(tmp_path):
    script = tmp_path / "fork_after_fit.py"
    script.write_text(SCRIPT)
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=environment)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for method in ("svi", "map", "nuts"):
        assert f"{method}: the child's fit equals the parent's" in done.stdout
