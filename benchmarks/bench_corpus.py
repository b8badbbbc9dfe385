"""The corpus of user-style stories: path taken, NUTS wall time, agreement with the truth.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_corpus.py                 # every story, ppl_notes only
    .venv/bin/python benchmarks/bench_corpus.py --pyro          # also plain Pyro's NUTS
    .venv/bin/python benchmarks/bench_corpus.py --svi           # also the default SVI
    .venv/bin/python benchmarks/bench_corpus.py gmm_vindex ar1_python_loop

For each story of ``tests/corpus``: the evaluation path ppl_notes chose (``plate``,
``vmap``, ``loop``), the NUTS wall time (4 chains x (500 warmup + 500 draws), compile
included), the largest |mean - truth| / MCSE over the parameters, and with ``--pyro`` plain
Pyro's NUTS (``pyro.infer.MCMC``, one chain of 100 warmup + 100 draws, its default
``init_to_uniform``) as milliseconds per iteration next to ours, since a full plain-Pyro
run of every story takes hours here; with ``--svi`` the default SVI's wall time (imports
and its verdict's draws included). Each fit runs in a fresh process.
"""

from __future__ import annotations

import argparse
import sys
import time

from _fresh import CORPUS_PREAMBLE, ROOT, run_fresh  # benchmarks/ is on the path

CHILD = CORPUS_PREAMBLE + r"""
if {engine!r} == "svi":
    from ppl_notes import infer
    fit = infer(case.story, case.data, method="svi", progress=False)
    print(json.dumps({{"svi_wall_s": time.perf_counter() - started,
                      "optimizer": fit.info.get("optimizer")}}))
elif {engine!r} == "pyro":
    import pyro, torch
    from pyro.infer import MCMC, NUTS
    torch.set_default_dtype(torch.float64)
    data = case.story.prepare_data(case.data)
    case.story.check_data(data)
    from ppl_notes.evaluation import story_facts
    facts = story_facts(case.story, data)
    kernel = NUTS(case.story, max_plate_nesting=facts.plate_nesting)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=100, disable_progbar=True)
    t = time.perf_counter()
    mcmc.run(**data)
    print(json.dumps({{"pyro_ms_per_iteration": 1000 * (time.perf_counter() - t) / 200}}))
else:
    from ppl_notes import infer
    fit = infer(case.story, case.data, method="nuts", progress=False, chains=4, warmup=500,
                draws=500, **case.nuts)
    wall = time.perf_counter() - started
    info = json.loads(fit.to_arviz().attrs["info"])
    worst = 0.0
    for element, moments in case.truth.items():
        draws = case.draws(fit, element)
        mcse = float(arviz_stats.mcse(draws, method="mean"))
        mcse = (mcse ** 2 + case.reference_mcse.get(element, 0.0) ** 2) ** 0.5
        worst = max(worst, abs(float(draws.mean()) - float(moments.mean[0])) / mcse)
    diverging = int(np.asarray(fit.to_arviz()["sample_stats"]["diverging"]).sum())
    print(json.dumps({{"path": info["path"], "compiler": info["compiler"], "wall_s": wall,
                      "ms_per_iteration": 1000 * wall / (4 * 1000),
                      "worst_z": worst, "divergences": diverging}}))
"""


def run_child(name: str, engine: str) -> dict:
    """One story by one engine, in a fresh process."""
    return run_fresh(CHILD.format(root=str(ROOT), name=name, engine=engine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--pyro", action="store_true", help="also time plain Pyro's NUTS")
    parser.add_argument("--svi", action="store_true",
                        help="also time the default SVI (fresh process, imports included)")
    parser.add_argument("--pyro-only", action="store_true",
                        help="only plain Pyro's ms per iteration (to pair with an earlier run)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.corpus.cases import CASES

    names = args.names or list(CASES)
    if args.pyro_only:
        for name in names:
            theirs = run_child(name, "pyro")
            value = theirs.get("pyro_ms_per_iteration")
            print(f"{name:42s} pyro ms/it " + (f"{value:9.2f}" if value is not None
                                               else theirs.get("error", "?")), flush=True)
        return
    print(f"{'story':42s} {'path':5s} {'wall s':>7s} {'ms/it':>7s} {'max z':>6s} {'div':>4s}"
          + (f" {'pyro ms/it':>10s} {'ratio':>6s}" if args.pyro else "")
          + (f" {'svi s':>6s}" if args.svi else ""))
    for name in names:
        started = time.perf_counter()
        ours = run_child(name, "ppl_notes")
        if "error" in ours:
            print(f"{name:42s} ERROR {ours['error']}")
            continue
        line = (f"{name:42s} {ours['path']:5s} {ours['wall_s']:7.1f} "
                f"{ours['ms_per_iteration']:7.2f} {ours['worst_z']:6.2f} {ours['divergences']:4d}")
        if args.pyro:
            theirs = run_child(name, "pyro")
            if "error" in theirs:
                line += f" pyro error: {theirs['error']}"
            else:
                ratio = theirs["pyro_ms_per_iteration"] / ours["ms_per_iteration"]
                line += f" {theirs['pyro_ms_per_iteration']:10.2f} {ratio:6.1f}"
        if args.svi:
            svi = run_child(name, "svi")
            line += (f" {svi['svi_wall_s']:6.1f}" if "svi_wall_s" in svi
                     else f" svi error: {svi.get('error')}")
        print(line, flush=True)
        del started


if __name__ == "__main__":
    main()
