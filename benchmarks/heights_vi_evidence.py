"""Is the heights posterior Gaussian in the unconstrained coordinates? The evidence.

Run by hand (about a minute here)::

    .venv/bin/python benchmarks/heights_vi_evidence.py --out docs/heights_vi_vs_nuts.png

The full-rank Gaussian family over the unconstrained globals (the stick-breaking logit
of alpha, the ordered transform's coordinates of mu, log sigma) is the family of both
the full-rank autoguide and the hand-written ``ppl_notes.guides.heights.fullrank``. This
script fits it with both Gaussian-VI optimisers and with 16 and 256 fixed-draw pairs per
restart, prints each element's sd over NUTS's and the Pareto k-hat of p/q, and draws the
marginals of the default fit over NUTS's (the figure in docs/vi.md). If every optimiser
and draw count ends at the same sds, short of NUTS's, and k-hat is above 0.5, the
shortfall belongs to the family -- the KL(q||p) optimum of a Gaussian on a posterior that
is not Gaussian in these coordinates -- not to the optimiser.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = ["alpha", "mu", "sigma"]


def _sds(fit) -> np.ndarray:
    return np.concatenate([np.asarray(fit.draws(s)).reshape(fit.num_draws, -1).std(0)
                           for s in SITES])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("heights_vi_vs_nuts.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import ppl_notes.vi.fixed_draws as fixed_draws
    from ppl_notes import infer
    from ppl_notes.models.heights import model as heights
    from ppl_notes.plots import plot_marginals

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nuts = infer(heights, method="nuts", progress=False)
        reference = _sds(nuts)
        default = None
        for optimizer in ("newton", "dadvi"):
            for pairs in (16, 256):
                fixed_draws.MIN_PAIRS = pairs
                fit = infer(heights, method="svi", optimizer=optimizer, progress=False)
                ratios = _sds(fit) / reference
                print(f"{optimizer:7s} {pairs:4d} pairs: sd / NUTS sd = "
                      f"{np.array2string(ratios, precision=3)}  k-hat "
                      f"{fit.diagnostics()['khat']:.2f}", flush=True)
                if optimizer == "newton" and pairs == 16:
                    default = fit
        fixed_draws.MIN_PAIRS = 16
        collection = plot_marginals({"full-rank VI (default)": default, "NUTS": nuts},
                                    var_names=SITES)
        figure = collection.get_viz("figure")
        figure.suptitle(f"heights: full-rank Gaussian VI vs NUTS (Pareto k-hat of p/q "
                        f"{default.diagnostics()['khat']:.2f})")
        figure.savefig(args.out, dpi=80)
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
