"""Stationary Gaussian colour textures with chosen power spectra: a data set whose law is known exactly.

A texture here is a periodic Gaussian field x = mean + std * M z, where each of the three channels of z
is an independent zero-mean field with power spectrum P(f) (normalised to unit pixel variance) and M is a
fixed 3x3 colour mixing matrix shared by every class. Classes differ only in P: they have the same mean,
the same pixel variance and the same colour covariance, so telling them apart means measuring how the
image's energy is spread over frequencies (what a texture classifier must do).

Because the law is known, two things can be computed exactly rather than estimated:
- ``bayes_log_likelihood``: log p(y | c) of a noisy texture y = x + sigma * eps under each class, hence the
  Bayes (optimal) classifier's accuracy, the ceiling of any classifier on this data;
- ``spectrum``: the true power spectrum, against which a sampler's average spectrum can be checked.

Pixels are in [0, 1]; the fields are generated at std 0.1 around 0.5, so values outside [0, 1] (which
``timm_joint.data.prepare_textures`` clips when it writes the images) lie more than 5 standard deviations out and essentially never occur.
"""
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

__all__ = ['KINDS', 'spectrum', 'sample', 'bayes_log_likelihood', 'COLOUR_MIX', 'radial_profile']

# A fixed colour mixing: a strong luminance component and two weaker opponent ones (orthogonal rows),
# as in natural images; the same for every class.
COLOUR_MIX = np.array([[1., 1., 1.], [1., 0., -1.], [0.5, -1., 0.5]]).T * np.array([0.9, 0.35, 0.2])
COLOUR_MIX = COLOUR_MIX / np.sqrt((COLOUR_MIX ** 2).sum(1, keepdims=True))  # unit variance per channel

# Four classes in a 2 x 2 design: spectral slope (power ~ 1/f^2, as natural images, or the steeper
# 1/f^2.2) times orientation (isotropic, or stretched 1.3x along x: faint horizontal streaks). Close on
# purpose: the Bayes classifier reaches about 96 % at sigma 15/255 and 85 % at 25/255 on 32 px fields
# (``bayes_log_likelihood``), so the task has a known ceiling below 100 %.
KINDS = {
    'pink': (2.0, 1.0),
    'steep': (2.2, 1.0),
    'pink_streaks': (2.0, 1.3),
    'steep_streaks': (2.2, 1.3),
}


def _freqs(size: int) -> Tuple[np.ndarray, np.ndarray]:
    f = np.fft.fftfreq(size)  # cycles per pixel, in [-0.5, 0.5)
    return np.meshgrid(f, f, indexing='ij')  # (f_y, f_x)


def spectrum(kind: str, size: int) -> np.ndarray:
    """The power spectrum P(f) of one channel of ``kind``, [size, size] in numpy's fft2 layout.

    P(f) = 1 / ((a f_x)^2 + (f_y / a)^2 + f0^2)^(alpha / 2), with (alpha, a) = ``KINDS[kind]`` and
    f0 = 1 / size, normalised so that a field with this spectrum has unit pixel variance and zero mean
    (P(0) = 0).
    """
    if kind not in KINDS:
        raise ValueError(f'unknown texture kind {kind!r}: expected one of {tuple(KINDS)}')
    alpha, aniso = KINDS[kind]
    fy, fx = _freqs(size)
    f0 = 1. / size  # regularises the power law at the lowest frequencies
    p = 1. / ((aniso * fx) ** 2 + (fy / aniso) ** 2 + f0 ** 2) ** (alpha / 2)
    p[0, 0] = 0.
    return p * (size * size) / p.sum()  # unit variance: mean over pixels of x^2 = sum(P) / N^2


def sample(kind: str, n: int, size: int, *, rng: np.random.Generator, mean: float = 0.5,
           std: float = 0.1) -> np.ndarray:
    """Draw ``n`` textures of ``kind``, [n, 3, size, size], float64, not clipped.

    Each channel of z is white noise filtered by sqrt(P) in the Fourier domain (periodic), then mixed
    by ``COLOUR_MIX`` and scaled to ``std`` around ``mean``.
    """
    amp = np.sqrt(spectrum(kind, size))
    white = rng.standard_normal((n, 3, size, size))
    z = np.fft.ifft2(np.fft.fft2(white) * amp).real
    x = np.einsum('ij,njhw->nihw', COLOUR_MIX, z)
    return mean + std * x


def bayes_log_likelihood(y: torch.Tensor, sigma: float, *, kinds: Sequence[str] = tuple(KINDS), mean: float = 0.5,
                         std: float = 0.1) -> torch.Tensor:
    """Exact log p(y | c), up to a constant shared by all classes, of noisy textures y = x + sigma * eps.

    Under class c, the colour-decorrelated channels of y - mean are independent Gaussian fields whose
    Fourier coefficients are independent with variance N^2 * (std^2 * lambda_k * P_c(f) + sigma^2)
    (lambda_k: the eigenvalues of the colour covariance), so the log-likelihood is a sum over
    frequencies.

    Args:
        y: Noisy textures [B, 3, H, H] (periodic fields of one size), pixels in [0, 1] units.
        sigma: Noise level in pixel units.

    Returns:
        [B, len(kinds)] log-likelihoods; argmax over classes is the Bayes classifier (equal priors).
    """
    size = y.shape[-1]
    if y.ndim != 4 or y.shape[1] != 3 or y.shape[-2] != size:
        raise ValueError(f'expected square textures [B, 3, H, H], got {list(y.shape)}')
    cov = COLOUR_MIX @ COLOUR_MIX.T
    lam, vec = np.linalg.eigh(cov)
    z = torch.einsum('ki,nihw->nkhw', torch.as_tensor(vec.T, dtype=torch.float64), y.double() - mean)
    power = torch.fft.fft2(z).abs().pow(2) / (size * size)  # [B, 3, H, H], periodogram
    out = []
    for kind in kinds:
        p = torch.as_tensor(spectrum(kind, size))
        var = std ** 2 * torch.as_tensor(lam)[:, None, None] * p + sigma ** 2  # [3, H, H]
        out.append(-(power / var + var.log()).sum((1, 2, 3)) / 2)
    return torch.stack(out, 1)


def radial_profile(power: np.ndarray, num_bins: int = None) -> Dict[str, np.ndarray]:
    """Average a power spectrum [..., H, H] (fft2 layout) over rings of equal radial frequency.

    Returns:
        dict with 'freq' (ring centres, cycles per pixel) and 'power' (mean power per ring, over the
        leading axes too); ring 0 (the mean) is left out.
    """
    size = power.shape[-1]
    fy, fx = _freqs(size)
    r = np.sqrt(fy ** 2 + fx ** 2)
    num_bins = num_bins or size // 2
    edges = np.linspace(0, 0.5, num_bins + 1)
    p = power.reshape(-1, size, size).mean(0)
    freq, prof = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (r > lo) & (r <= hi)
        if m.any():
            freq.append(r[m].mean())
            prof.append(p[m].mean())
    return {'freq': np.array(freq), 'power': np.array(prof)}
