r"""The variational autoencoder's story on scikit-learn's bundled digits (notes §2.g.ii).

The story: each 8x8 image i draws a code :math:`z_i \sim \mathcal N(0, I_d)`; a decoder
network turns the code into 64 pixel probabilities, and each pixel is drawn
:math:`x_{ij} \sim \mathrm{Bernoulli}(\mathrm{decoder}(z_i)_j)`. The decoder's weights are
the model's parameters (fitted by maximising the ELBO, as EM's M-step fits theta); the
codes are the latent variables whose posterior an amortised encoder approximates
(:mod:`ppl_notes.guides.vae`). The reparameterisation trick makes the ELBO's gradient flow
through the sampled codes (Kingma & Welling 2014).

The data are scikit-learn's ``load_digits`` (1797 images shipped with the package, no
download), binarised at half intensity.

References
----------
Kingma, D. P. & Welling, M. (2014). Auto-encoding variational Bayes. ICLR.
Rezende, D. J., Mohamed, S. & Wierstra, D. (2014). Stochastic backpropagation and
approximate inference in deep generative models. ICML.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from ppl_notes.story import model as _model

__all__ = ["vae", "load_digits_binarised", "digit_labels", "decode", "mlp_parameters",
           "reconstruct", "generate"]

PIXELS = 64


def load_digits_binarised() -> dict[str, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, each pixel 1 where its intensity is above half."""
    from sklearn.datasets import load_digits

    images = load_digits().data  # (1797, 64), intensities 0..16
    return {"pixels": (images > 8).astype(float)}


def digit_labels() -> np.ndarray:
    """Which digit each image shows (0-9), for colouring the codes; not data of the story."""
    from sklearn.datasets import load_digits

    return load_digits().target


def mlp_parameters(prefix: str, sizes: list[int], dtype) -> list[tuple]:
    """``(weight, bias)`` of each layer as ``pyro.param`` s, Glorot-initialised."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        scale = (2.0 / (fan_in + fan_out)) ** 0.5
        weight = pyro.param(f"{prefix}_w{i}", lambda a=fan_in, b=fan_out, s=scale:
                            s * torch.randn(a, b, dtype=dtype))
        bias = pyro.param(f"{prefix}_b{i}", lambda b=fan_out: torch.zeros(b, dtype=dtype))
        layers.append((weight, bias))
    return layers


def _forward(layers, h):
    for i, (weight, bias) in enumerate(layers):
        h = h @ weight + bias
        if i < len(layers) - 1:
            h = F.softplus(h)
    return h


def decode(layers, z: torch.Tensor) -> torch.Tensor:
    """The decoder: codes ``(..., d)`` to pixel logits ``(..., 64)``."""
    return _forward(layers, z)


@_model(observed="pixels", data=load_digits_binarised, name="vae",
        dims={"z": ["latent"], "pixels": ["pixel"]},
        coords=lambda data: {"digits": np.arange(len(data["pixels"])),
                             "latent": np.arange(int(data.get("latent_dim", 2))),
                             "pixel": np.arange(PIXELS)},
        defaults={"svi": {"steps": 3000, "learning_rate": 0.01, "num_draws": 20,
                          "engine": "pyro"}})
def vae(pixels=None, num_digits=None, latent_dim=2, hidden=128):
    """Draw each image's code z_i ~ Normal(0, I); then its 64 pixels from the decoder.

    x_ij ~ Bernoulli(sigmoid(decoder(z_i))_j), with the decoder a two-layer network.
    """
    dtype = pixels.dtype if pixels is not None else torch.float64
    num = pixels.shape[0] if pixels is not None else (num_digits or 16)
    layers = mlp_parameters("decoder", [latent_dim, hidden, PIXELS], dtype)
    with pyro.plate("digits", num):
        z = pyro.sample("z", dist.Normal(torch.zeros(latent_dim, dtype=dtype), 1.0).to_event(1))
        pyro.sample("pixels", dist.Bernoulli(logits=decode(layers, z)).to_event(1), obs=pixels)


def encode(layers, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder: pixels ``(..., 64)`` to the code's mean and sd ``(..., d)`` each."""
    h = pixels
    for weight, bias in layers[:-1]:
        h = F.softplus(h @ weight + bias)
    weight, bias = layers[-1]
    out = h @ weight + bias
    loc, raw_scale = out.chunk(2, dim=-1)
    return loc, F.softplus(raw_scale) + 1e-3


def _fitted_layers(posterior, prefix: str) -> list[tuple]:
    params = posterior.to_arviz()["fitted_params"]
    count = sum(1 for name in params.data_vars if str(name).startswith(f"{prefix}_w"))
    return [(torch.as_tensor(params[f"{prefix}_w{i}"].values),
             torch.as_tensor(params[f"{prefix}_b{i}"].values)) for i in range(count)]


def reconstruct(posterior, pixels) -> np.ndarray:
    """Pixel probabilities of each image decoded from its encoder's mean code."""
    pixels = torch.as_tensor(np.asarray(pixels, dtype=float))
    loc, _ = encode(_fitted_layers(posterior, "encoder"), pixels)
    with torch.no_grad():
        return torch.sigmoid(decode(_fitted_layers(posterior, "decoder"), loc)).numpy()


def generate(posterior, num: int, seed: int = 0) -> np.ndarray:
    """New images' pixel probabilities: codes from the prior, through the fitted decoder."""
    layers = _fitted_layers(posterior, "decoder")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num, layers[0][0].shape[0], generator=generator, dtype=layers[0][0].dtype)
    with torch.no_grad():
        return torch.sigmoid(decode(layers, z)).numpy()
