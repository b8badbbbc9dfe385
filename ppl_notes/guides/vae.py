"""The VAE's amortised guide: an encoder network gives each image's q(z_i | x_i)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_notes.models.vae import PIXELS, encode, mlp_parameters, vae
from ppl_notes.story import guide as _guide

__all__ = ["encoder", "encode"]


@_guide(vae, name="encoder")
def encoder(pixels=None, num_digits=None, latent_dim=2, hidden=128):
    r"""q(z_i | x_i) = Normal(mu(x_i), sigma(x_i)): one network for every image (amortised).

    Sampling z = mu + sigma * eps with eps ~ Normal(0, I) is the reparameterisation trick:
    the ELBO's gradient reaches the encoder's weights through the sample.
    """
    dtype = pixels.dtype if pixels is not None else torch.float64
    layers = mlp_parameters("encoder", [PIXELS, hidden, 2 * latent_dim], dtype)
    with pyro.plate("digits", pixels.shape[0]):
        loc, scale = encode(layers, pixels)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))
