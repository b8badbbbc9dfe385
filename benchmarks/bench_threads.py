"""Default SVI and NUTS at 1 and at torch's default intra-op threads, by data size.

Run by hand, idle and then beside busy processes (benchmarks/under_load.py):

    .venv/bin/python benchmarks/bench_threads.py [--sizes 1000 30000 100000 300000]
    .venv/bin/python benchmarks/under_load.py -- .venv/bin/python benchmarks/bench_threads.py

A 3-parameter linear regression written as users write it (``X @ w``, N rows) is fitted
by default SVI and by NUTS (4 chains x 500 draws after 500 warmup) in one warm process,
each fit three times on one thread, on torch's default and as ppl_notes sizes the
threads itself (the first two fixed by ``PPL_NOTES_THREADS``); the table gives each
median wall time, the ratio of one thread's to the default's, and of the sized run's to
the better of the two (1.0: the sizing chose right).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch


def regression(X, y):
    """``y ~ Normal(X @ w, sigma)`` with three coefficients."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)


def _data(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((size, 3))
    return {"X": X, "y": X @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(size)}


def _time(method: str, data, threads: int | None, repeats: int) -> float:
    from ppl_notes import infer

    if threads is None:  # ppl_notes' own sizing
        os.environ.pop("PPL_NOTES_THREADS", None)
    else:
        os.environ["PPL_NOTES_THREADS"] = str(threads)
    options = {"chains": 4, "warmup": 500, "draws": 500} if method == "nuts" else {}
    times = []
    for seed in range(repeats):
        started = time.perf_counter()
        infer(regression, data, method=method, seed=seed, progress=False, **options)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 30000, 100000, 300000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["svi", "nuts"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    default = torch.get_num_threads()
    print(f"torch's default intra-op threads: {default}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'method':>6} {'N':>8} {'1 thread s':>11} {f'{default} threads s':>11} "
          f"{'sized s':>8} {'1/default':>9} {'sized/best':>10}")
    for method in args.methods:
        for size in args.sizes:
            data = _data(size)
            _time(method, data, 1, 1)  # warm: the tape of this size, the imports
            one = _time(method, data, 1, args.repeats)
            many = _time(method, data, default, args.repeats)
            sized = _time(method, data, None, args.repeats)
            print(f"{method:>6} {size:>8} {one:>11.2f} {many:>11.2f} {sized:>8.2f} "
                  f"{one / many:>9.2f} {sized / min(one, many):>10.2f}", flush=True)


if __name__ == "__main__":
    main()
