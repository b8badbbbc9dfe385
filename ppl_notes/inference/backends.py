"""The back ends ``infer()`` runs: one declared protocol, one table.

Every inference method is a :class:`Backend`: its name, its options (each a checked
:class:`~ppl_notes.inference._options.Option`), whether it fits a guide, whether its
posterior is draws (rather than one point), and the function that runs it.
:data:`BACKENDS` is the only list of methods: ``infer()``, ``calibrate()``, the command
line and the docs all read it, and an IDE follows each entry to the function it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ppl_notes._result import RunResult
from ppl_notes.evaluation import RunContext
from ppl_notes.inference import bbvi, em, nuts, pathfinder, point, svi

__all__ = ["Backend", "Runner", "BACKENDS", "backend_of", "methods_with"]


class Runner(Protocol):
    """What a back end's ``run`` is: a run context in, a RunResult out.

    The :class:`~ppl_notes.evaluation.context.RunContext` holds the story, its prepared
    data and facts, the guide (a function, a family name such as ``"fullrank"``, or
    None), the seed, and every option of the method, each checked and defaulted by
    ``infer()``.
    """

    def __call__(self, context: RunContext) -> RunResult:
        """Fit ``context.model`` to ``context.data``."""


@dataclass(frozen=True)
class Backend:
    """One inference method.

    Attributes
    ----------
    name : str
        What ``infer(method=...)`` calls it.
    run : Runner
        The function that runs it.
    options : tuple of Option
        Its options, with types, defaults and the documentation ``infer`` shows.
    summary : str
        One line for listings (``ppl-notes run --help``, the docs).
    takes_guide : bool
        Fits a guide function (``guide=``).
    guide_families : tuple of str
        The guides it names by string (``"meanfield"``, ``"fullrank"``, ``"lowrank"``),
        and takes a story's recommended guide when none is given.
    draws : bool
        Its posterior is draws (MCMC or a variational family), not one point:
        ``calibrate()`` can check it.
    minibatch : bool
        Fits a story whose plate draws mini-batches (``subsample_size``), with the
        log-likelihood scaled as Pyro scales it; the others need the whole data at
        every step and refuse such a story, naming the plate.
    """

    name: str
    run: Runner
    options: tuple
    summary: str
    takes_guide: bool = False
    guide_families: tuple[str, ...] = ()
    draws: bool = True
    minibatch: bool = False

    @property
    def module(self) -> str:
        """The module of :attr:`run` (where worker processes find it again)."""
        return self.run.__module__


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    Backend("svi", svi.run, svi.OPTIONS, "variational inference: a Gaussian on the "
            "compiled potential, or a guide function by Adam on the ELBO", takes_guide=True,
            guide_families=("meanfield", "fullrank", "lowrank", "flow"), minibatch=True),
    Backend("nuts", nuts.run, nuts.OPTIONS, "the No-U-Turn sampler (MCMC)"),
    Backend("map", point.run_map, point.OPTIONS, "the posterior mode, by L-BFGS",
            draws=False),
    Backend("mle", point.run_mle, point.OPTIONS, "the maximum-likelihood estimate, by "
            "L-BFGS", draws=False),
    Backend("em", em.run, em.OPTIONS, "expectation-maximisation for discrete latent sites",
            draws=False),
    Backend("bbvi", bbvi.run, bbvi.OPTIONS, "black-box VI: score-function gradients, "
            "Robbins-Monro steps", takes_guide=True, minibatch=True),
    Backend("pathfinder", pathfinder.run, pathfinder.OPTIONS, "multi-path Pathfinder "
            "with PSIS resampling"),
)}


def backend_of(method: str) -> Backend:
    """The :class:`Backend` called ``method``; a KeyError names the methods."""
    try:
        return BACKENDS[method]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; the methods are {sorted(BACKENDS)}") \
            from None


def methods_with(test: Callable[[Backend], bool]) -> list[str]:
    """The names of the back ends ``test`` holds for, in the table's order."""
    return [name for name, backend in BACKENDS.items() if test(backend)]
