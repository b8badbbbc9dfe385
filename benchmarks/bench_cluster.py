"""Many fits on Dask: replicates per second with 1 and 2 workers, and what each task costs.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_cluster.py [--replicates 60]

Starts a scheduler and N one-thread workers on 127.0.0.1 as subprocesses
(``tests/dask_cluster.py``), runs ``calibrate(normal_mean, "nuts", replicates=R)`` on
them (one chain of 500 warmup + 1000 draws per replicate, its defaults) and prints:

* replicates per second with 1 and 2 workers, and the parallel efficiency
  ``rate(2) / (2 rate(1))``; the workers are started (and import torch and ppl_notes on
  their first task) before the clock starts, as a long-lived cluster would be;
* the same with this machine's own worker processes (``scheduler=None``), start-up
  included, for comparison;
* what each task ships: the pickled job (story, options, covariates) and one result;
* the scheduler's cost per task: the wall time of 2000 empty tasks over the workers.
"""

from __future__ import annotations

import argparse
import sys
import time

from _fresh import ROOT  # benchmarks/ is on the path


def _empty(i: int) -> int:
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=60)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import cloudpickle
    import distributed

    from ppl_notes import calibrate
    from ppl_notes.calibration import _one_replicate
    from ppl_notes.models.conjugate import normal_mean
    from tests.dask_cluster import dask_cluster

    rates = {}
    for workers in (1, 2):
        with dask_cluster(workers) as cluster:
            with distributed.Client(cluster.address, set_as_default=False) as client:
                client.run(lambda: __import__("ppl_notes.inference"))  # warm imports
                calibrate(normal_mean, "nuts", replicates=2 * workers, scheduler=client,
                          store=False, progress=False, seed=99)  # each worker compiles once
                started = time.perf_counter()
                calibrate(normal_mean, "nuts", replicates=args.replicates, scheduler=client,
                          store=False, progress=False)
                rates[workers] = args.replicates / (time.perf_counter() - started)
                if workers == 2:
                    started = time.perf_counter()
                    client.gather(client.map(_empty, range(2000), pure=False))
                    per_task = (time.perf_counter() - started) / 2000
        print(f"Dask, {workers} worker(s): {rates[workers]:.2f} replicates/s", flush=True)
    print(f"parallel efficiency on 2 workers: {rates[2] / (2 * rates[1]):.2f}")
    print(f"scheduler round trip per empty task (2 workers): {1000 * per_task:.2f} ms")
    for processes in (1, 2):
        started = time.perf_counter()
        calibrate(normal_mean, "nuts", replicates=args.replicates, store=False,
                  processes=processes, progress=False)
        rate = args.replicates / (time.perf_counter() - started)
        print(f"local pool, {processes} process(es), start-up included: {rate:.2f} "
              "replicates/s")
    job = cloudpickle.dumps({"model": normal_mean, "method": "nuts",
                             "options": {"chains": 1, "warmup": 500, "draws": 1000},
                             "covariates": normal_mean._default_covariates(), "seed": 0,
                             "parameters": {"mu": ()}})
    record = _one_replicate(job, 0)
    print(f"shipped per task: job {len(job)} bytes (sent once per task), "
          f"result {len(cloudpickle.dumps(record))} bytes")


if __name__ == "__main__":
    main()
