"""Checks of a guide before SVI's first step.

The sites it draws, whether its particles can be vectorised, and whether an autoguide can
follow the story's supports.
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from ppl_notes._sites import latent_sites, strip_independent, trace_model
from ppl_notes.errors import StoryError
from ppl_notes.evaluation import StoryFacts
from ppl_notes.evaluation.draws import no_log_q_error


def guide_site_names(guide, data) -> list[str]:
    """The latent sites a guide draws (one run of it, seeded, without gradients).

    Its log density at that draw is computed too, so that a guide without one (a flow
    Pyro cannot invert) is refused before any step rather than after the fit.
    """
    with pyro.poutine.seed(rng_seed=0), torch.no_grad():
        trace = poutine.trace(guide).get_trace(**data)
        try:
            trace.compute_log_prob()
        except (KeyError, NotImplementedError) as failure:
            raise no_log_q_error(guide, failure) from failure
    return list(latent_sites(trace))


def _support_bounds(support) -> list:
    """A constraint's bounds (``Interval(0, 1 - alpha1)``'s 0 and 1 - alpha1), unwrapped."""
    support = strip_independent(support)
    return [getattr(support, name) for name in ("lower_bound", "upper_bound")
            if hasattr(support, name)]


def moving_supports(model, data: dict[str, Any], latent) -> dict[str, tuple]:
    """The latent sites whose support depends on other latent sites, with two examples.

    The story is traced at two prior draws; a site whose support's bounds differ between
    them (GARCH's ``beta1 ~ Uniform(0, 1 - alpha1)``) is returned as ``{name: (support
    in one draw, support in the other)}``.
    """
    try:
        first, second = (trace_model(model, data, seed) for seed in (11, 12))
    except Exception:  # noqa: BLE001 - a story that fails at a prior draw: no evidence here
        return {}
    moving = {}
    for name in latent:
        if name not in first.nodes or name not in second.nodes:
            continue
        a, b = first.nodes[name]["fn"].support, second.nodes[name]["fn"].support
        bounds_a, bounds_b = _support_bounds(a), _support_bounds(b)
        if len(bounds_a) != len(bounds_b) or any(
                not torch.equal(torch.as_tensor(x), torch.as_tensor(y))
                for x, y in zip(bounds_a, bounds_b, strict=True)):
            moving[name] = (a, b)
    return moving


def refuse_moving_supports(model, data: dict[str, Any], family: str, facts: StoryFacts
                           ) -> None:
    """An autoguide cannot follow a support that moves: say so before any step.

    Only the sites the autoguide fits count (enumerated discrete sites are hidden from it).
    """
    fitted = [n for n in facts.latent if n not in facts.discrete and n not in facts.unenumerable]
    moving = moving_supports(model, data, fitted)
    if not moving:
        return
    name, (a, b) = next(iter(moving.items()))
    raise StoryError(
        f"site {name!r}: its support depends on other latent sites ({a} at one prior draw, "
        f"{b} at another), and the {family!r} autoguide maps {name!r} into the support it "
        f"sees when it is built, so later draws leave the moving bound and the fit fails "
        f"mid-way. Reparameterise the story ({name} = bound * u with u on a fixed "
        f"interval, plus the log-Jacobian as a pyro.factor), or pass a guide that draws "
        f"{name!r} inside the bound its own draws of the other sites give. NUTS and the "
        f"default optimizer='newton' take such stories as they are")


def vectorizable(guide, data, plate_nesting: int, particles: int = 3) -> bool:
    """Whether the guide's draws can be vectorised over particles.

    Every latent value drawn under a particle plate must have the particle dim where
    Pyro puts it (``-(plate_nesting + 1)`` left of the event dims) and no dim left of
    it, as ``vectorize_particles`` needs.
    """
    dim = -(plate_nesting + 1)
    try:
        with (poutine.seed(rng_seed=0), torch.no_grad(),
              pyro.plate("_particles", particles, dim=dim)):
            trace = poutine.trace(guide).get_trace(**data)
    except (RuntimeError, ValueError, IndexError):
        return False
    for site in latent_sites(trace).values():
        value = site["value"]
        batch = value.shape[:value.dim() - site["fn"].event_dim]
        if len(batch) > -dim or (len(batch) == -dim and batch[0] not in (1, particles)):
            return False
    return True
