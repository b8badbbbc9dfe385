r"""Discrete sites that form a chain, drawn by forward filtering and backward sampling.

A hidden Markov model's states :math:`z_1, \dots, z_T` (written with ``pyro.markov``),
with their emissions, factor as

.. math::

    p(z, x \mid \theta) = \prod_t \psi_t(z_t) \prod_{t > 1} \phi_t(z_{t-1}, z_t):

every factor of the story's enumerated run depends on one state or on two neighbours.
Then :math:`p(z \mid x, \theta)` is drawn exactly by forward filtering, backward sampling
(Carter & Kohn 1994; Frühwirth-Schnatter 1994), in log space:

.. math::

    \alpha_1 = \log\psi_1, \qquad
    \alpha_t(z_t) = \log\psi_t(z_t) + \log\sum_{z_{t-1}}
        e^{\alpha_{t-1}(z_{t-1}) + \log\phi_t(z_{t-1}, z_t)},

    z_T \sim \operatorname{softmax} \alpha_T, \qquad
    z_t \mid z_{t+1} \sim \operatorname{softmax}\,[\alpha_t(z_t)
        + \log\phi_{t+1}(z_t, z_{t+1})].

One enumerated run of the story gives the factors. Pyro's ``infer_discrete`` draws from
the same distribution with a generic tensor contraction (about 1400 einsums on the HMM of
posteriordb) and a second run of the story. Factors inside a plate that no state is in
(observations of a global state) are summed over it; chains inside plates (independent
sequences) are drawn element by element. Anything else -- a factor of two states that are
not neighbours, of three states, a site with an event shape (one-hot) or enumerated
sequentially -- raises :class:`NotAChain`, and the caller uses ``infer_discrete``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["NotAChain", "Chain", "chain_of", "categorical_draw"]


class NotAChain(Exception):
    """The story's discrete sites are not a chain that :func:`chain_of` can take."""


def chain_of(trace, discrete: list[str], nesting: int) -> Chain:
    r"""The forward recursion over the chain of an enumerated run of the story.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        One run of the story with every other site's value given, the discrete sites
        enumerated in parallel left of ``nesting`` plate dims, and log probabilities
        computed.
    discrete : list of str
        The discrete latent sites.
    nesting : int
        The plate dims right of the enumeration dims.

    Returns
    -------
    Chain
        Its :meth:`~Chain.log_marginal` sums the states out; its :meth:`~Chain.draw`
        draws them from :math:`p(z \mid x, \theta)`, each shaped as its plates (the
        ``nesting`` rightmost dims).

    Raises
    ------
    NotAChain
        Where the factors are not a chain (module docstring), and where a factor's
        shapes do not fit one (a story this module did not foresee): the caller's
        generic contraction then takes the story as before.
    """
    try:
        return _forward(trace, discrete, nesting)
    except (RuntimeError, ValueError, IndexError) as error:
        raise NotAChain(f"the factors' shapes do not fit a chain ({error})") from error


def _forward(trace, discrete: list[str], nesting: int) -> Chain:
    order, unary, pair, support, rest = _chain_factors(trace, set(discrete), nesting)
    dtype, plates = _dtype(unary, pair), (1,) * nesting
    for previous, name in itertools.pairwise(order):  # neighbours that share no factor
        pair.setdefault(name, torch.zeros((support[previous].numel(), support[name].numel())
                                          + plates, dtype=dtype))
    alphas = []
    for k, name in enumerate(order):
        alpha = unary.get(name, torch.zeros((support[name].numel(),) + plates, dtype=dtype))
        if k:
            alpha = alpha + _logsumexp(alphas[-1].unsqueeze(1) + pair[name])
        alphas.append(alpha)
    return Chain(order, pair, support, alphas, rest)


@dataclass
class Chain:
    r"""A chain's factors and its forward messages :math:`\alpha_t` (:func:`chain_of`).

    Attributes
    ----------
    order : list of str
        The states in the order the story draws them.
    pair : dict of Tensor
        Under each state but the first, its factor with the state before it,
        ``(K_previous, K_state, *plates)``.
    support : dict of Tensor
        The values that each state's indices ``0 .. K - 1`` stand for.
    alphas : list of Tensor
        :math:`\alpha_t`, ``(K_t, *plates)``, in ``order``.
    rest : Tensor
        The sum of every factor that depends on no state.
    """

    order: list[str]
    pair: dict[str, torch.Tensor]
    support: dict[str, torch.Tensor]
    alphas: list[torch.Tensor]
    rest: torch.Tensor

    def log_marginal(self) -> torch.Tensor:
        r""":math:`\log \sum_z p(x, z, \theta)`: every site's log probability, z summed out.

        :math:`\log\sum_{z_T} e^{\alpha_T(z_T)}`, summed over the chain's plates, plus
        :attr:`rest`. It equals Pyro's ``TraceEinsumEvaluator`` on the same trace (to
        4e-12 on the HMM of posteriordb), with fewer operations: one run's sum took 23-30
        ms there and 1-2 ms here, which halved the path choice's time on that story.
        """
        return self.rest + _logsumexp(self.alphas[-1]).sum()

    def draw(self) -> dict[str, torch.Tensor]:
        """Each state drawn backwards from the last, given the one after it."""
        order, pair, alphas = self.order, self.pair, self.alphas
        chosen = {order[-1]: _draw(alphas[-1])}
        for k in range(len(order) - 2, -1, -1):
            following = pair[order[k + 1]]  # (K_k, K_{k+1}, plates)
            chosen[order[k]] = _draw(alphas[k] + _column(following, chosen[order[k + 1]]))
        return {name: self.support[name][chosen[name]] for name in order}


def _dtype(*groups: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next(t.dtype for group in groups for t in group.values())


#: The most values of a state for which a sum over them is written out value by value:
#: torch's reductions over a dim of 2 cost several times a few elementwise operations (the
#: HMM of posteriordb, 16000 draws under vmap: a step's logsumexp 1.6 ms, its
#: ``logaddexp`` 0.4 ms), and the tape runs ``logaddexp`` as one instruction
UNROLLED_STATES = 8


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over dim 0."""
    if x.shape[0] > UNROLLED_STATES:
        return torch.logsumexp(x, dim=0)
    rows = x.unbind(0)
    total = rows[0]
    for row in rows[1:]:
        total = torch.logaddexp(total, row)
    return total


def _column(pair: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``pair[:, index]`` for each plate element: ``(K_k, *plates)``."""
    if pair.shape[1] <= UNROLLED_STATES:
        columns = pair.unbind(1)
        picked = columns[0]
        for value, column in enumerate(columns[1:], start=1):
            picked = torch.where(index == value, column, picked)
        return picked
    plates = torch.broadcast_shapes(pair.shape[2:], index.shape)
    pair = pair.expand(pair.shape[:2] + plates)
    index = index.expand(plates).unsqueeze(0).unsqueeze(0)
    return pair.gather(1, index.expand((pair.shape[0], 1) + plates)).squeeze(1)


def categorical_draw(logits: torch.Tensor) -> torch.Tensor:
    """One index per element of dims 1.. from ``softmax(logits)`` over dim 0, by inverse CDF.

    One uniform per element, scaled by the cumulative sum's last value (1 up to rounding).
    """
    cumulative = torch.softmax(logits, dim=0).cumsum(0)
    uniform = torch.rand(cumulative.shape[1:], dtype=cumulative.dtype) * cumulative[-1]
    return (cumulative < uniform).sum(0).clamp(max=cumulative.shape[0] - 1)


def _draw(logits: torch.Tensor) -> torch.Tensor:
    """:func:`categorical_draw`, its sums written out value by value for a few values."""
    if logits.shape[0] > UNROLLED_STATES:
        return categorical_draw(logits)
    rows, total = logits.unbind(0), _logsumexp(logits)
    uniform = torch.rand(total.shape, dtype=total.dtype)
    cumulative = torch.exp(rows[0] - total)
    index = (uniform > cumulative).long()
    for row in rows[1:-1]:
        cumulative = cumulative + torch.exp(row - total)
        index = index + (uniform > cumulative).long()
    return index


def _chain_factors(trace, discrete: set[str], nesting: int):
    """The states in order, their unary and neighbour factors, and the sum of the rest.

    A unary factor of state ``z`` has shape ``(K_z, *plates)``; a neighbour factor, kept
    under the later state ``z``, ``(K_previous, K_z, *plates)``; ``support[z]`` holds the
    values that index ``k`` of ``K_z`` stands for; ``rest`` sums every factor that
    depends on no state.
    """
    order, position, current, support = [], {}, {}, {}
    unary, pair, chain_plates, rest = {}, {}, None, 0
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in discrete:
            infer = site["infer"]
            value, dim = site["value"], infer.get("_enumerate_dim")
            if (infer.get("enumerate") != "parallel" or dim is None or site["fn"].event_shape
                    or value.dim() < -dim or value.numel() != value.shape[dim]):
                raise NotAChain(f"site {name!r} is not enumerated in parallel as a scalar")
            plates = _plate_dims(site)
            if chain_plates is None:
                chain_plates = plates
            elif plates != chain_plates:
                raise NotAChain(f"site {name!r} sits in other plates than the chain's first")
            current[infer["_enumerate_dim"]] = name
            position[name] = len(order)
            order.append(name)
            support[name] = site["value"].reshape(-1)
        log_prob = site.get("log_prob")
        if log_prob is None:
            continue
        scope = _scope(log_prob, current, nesting)
        if not scope:
            rest = rest + log_prob.sum()
            continue
        if not _plate_dims(site) >= chain_plates:
            raise NotAChain(f"site {name!r} depends on the chain outside its plates")
        scope.sort(key=lambda s: position[s[1]])
        factor = _canonical(log_prob, [d for d, _ in scope], chain_plates, nesting)
        names = [s for _, s in scope]
        if len(names) == 1:
            unary[names[0]] = unary.get(names[0], 0) + factor
        elif len(names) == 2 and position[names[1]] == position[names[0]] + 1:
            pair[names[1]] = pair.get(names[1], 0) + factor
        else:
            raise NotAChain(f"site {name!r} joins states {names} that are not neighbours")
    if not order or set(order) != discrete:
        raise NotAChain(f"discrete sites {sorted(discrete - set(order))} were not enumerated "
                        "in this run")
    return order, unary, pair, support, rest


def _plate_dims(site) -> frozenset[int]:
    return frozenset(f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim < 0)


def _scope(log_prob: torch.Tensor, current: dict[int, str], nesting: int
           ) -> list[tuple[int, str]]:
    """``(enumeration dim, state)`` of each state the factor depends on."""
    scope = []
    for dim in range(-log_prob.dim(), -nesting):
        if log_prob.shape[dim] > 1:
            if dim not in current:
                raise NotAChain(f"a factor varies along dim {dim}, which no state holds")
            scope.append((dim, current[dim]))
    return scope


def _canonical(log_prob: torch.Tensor, dims: list[int], keep: frozenset[int],
               nesting: int) -> torch.Tensor:
    """``log_prob`` as ``(K for each of dims, *plates)``, summed over plates not kept."""
    rank = max(log_prob.dim(), nesting, -min(dims))
    factor = log_prob.reshape((1,) * (rank - log_prob.dim()) + tuple(log_prob.shape))
    summed = [d for d in range(-nesting, 0) if d not in keep and factor.shape[d] > 1]
    if summed:
        factor = factor.sum(summed, keepdim=True)
    factor = factor.movedim(dims, list(range(len(dims))))
    return factor.reshape(factor.shape[:len(dims)] + factor.shape[factor.dim() - nesting:])
