r"""Sticking the landing: the reparameterised ELBO gradient without its score term.

With :math:`z = g_\lambda(\epsilon)`, the reparameterised gradient of the ELBO is

.. math:: \nabla_\lambda \mathbb E_\epsilon[\log p(x, g_\lambda(\epsilon))
          - \log q_\lambda(g_\lambda(\epsilon))]
          = \mathbb E\big[(\nabla_z \log p - \nabla_z \log q)\,\nabla_\lambda g\big]
          - \mathbb E[\nabla_\lambda \log q_\lambda(z)\,|_{z\ \mathrm{fixed}}],

and the last term (the score) has expectation 0. Roeder, Wu & Duvenaud (2017), "Sticking
the Landing: Simple, Lower-Variance Gradient Estimators for Variational Inference"
(NeurIPS), drop it: the estimate stays unbiased, and when q equals the posterior the
first term vanishes for every :math:`\epsilon`, so the gradient's variance goes to 0 as
the fit lands -- the iterates settle instead of jittering.

Here the guide's log density is evaluated a second time at the same draws with its
parameters detached (:class:`DetachedParams`), so gradients reach :math:`\lambda` only
through :math:`z`.
"""

from __future__ import annotations

import pyro.poutine as poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger

__all__ = ["STLTrace_ELBO", "DetachedParams"]


class DetachedParams(Messenger):
    """Hand every ``pyro.param`` value out detached from its parameter."""

    def _pyro_post_param(self, msg) -> None:
        msg["value"] = msg["value"].detach()


class STLTrace_ELBO(Trace_ELBO):
    """Pyro's :class:`~pyro.infer.Trace_ELBO` with the sticking-the-landing gradient.

    The loss's value is Trace_ELBO's; only its gradient differs (module docstring).
    Guides with non-reparameterisable sites keep their score-function terms for those
    sites (they are the whole gradient there).
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        detached = poutine.trace(poutine.replay(DetachedParams()(guide), trace=guide_trace)
                                 ).get_trace(*args, **kwargs)
        for name, site in guide_trace.nodes.items():
            if (site["type"] == "sample" and not site["is_observed"]
                    and getattr(site["fn"], "has_rsample", False)):
                site["fn"] = detached.nodes[name]["fn"]
                for key in ("log_prob", "log_prob_sum", "unscaled_log_prob", "score_parts"):
                    site.pop(key, None)
        guide_trace.compute_score_parts()
        return model_trace, guide_trace
