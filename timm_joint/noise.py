"""Noise levels: units, validation, sampling and seeded noising.

Every function here speaks pixel units of [0, 1] images (``sigma=25/255``). Command lines, tables,
file names and figure labels use the 0-255 convention; ``from_255`` / ``to_255`` convert between them.

Noise used in training and evaluation is drawn from generators seeded per (seed, stream, epoch,
sample index), never per rank or per process: a sample gets the same noise whatever the number of
processes, and a run resumed in the middle of an epoch redraws exactly what it would have drawn.
"""
import numbers
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

SigmaLike = Union[float, int, torch.Tensor]

__all__ = [
    'from_255', 'to_255', 'check_sigma', 'sample_sigma', 'sample_seed', 'seeded_noise', 'add_noise',
    'STREAM_CLS', 'STREAM_DEN', 'STREAM_EVAL',
]

# Independent random streams: the same sample index must not get correlated noise in the two loaders.
STREAM_CLS, STREAM_DEN, STREAM_EVAL = 1, 2, 3


def from_255(sigma_255: Union[float, Sequence[float]]):
    """Convert a noise level (or a list of them) from the 0-255 convention to [0, 1] pixel units."""
    if isinstance(sigma_255, (list, tuple)):
        return [float(s) / 255. for s in sigma_255]
    return float(sigma_255) / 255.


def to_255(sigma: float) -> float:
    """Convert a noise level from [0, 1] pixel units to the 0-255 convention."""
    return float(sigma) * 255.


def check_sigma(
        sigma: SigmaLike,
        batch_size: int,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Validate a noise level and broadcast it to one value per image.

    Args:
        sigma: A positive float (pixel units of [0, 1] images), a 0-d tensor or a tensor [B].
        batch_size: B, the number of images it applies to.
        device: Device of the returned tensor.
        dtype: Floating dtype of the returned tensor.

    Returns:
        sigma as a tensor [B].

    Raises:
        TypeError: sigma is not a number or a tensor.
        ValueError: sigma is not finite and positive, or not of shape [] or [B].
    """
    # numbers.Real: Python and numpy scalars alike (np.float32 is not a float).
    if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, torch.Tensor)):
        raise TypeError(
            f'sigma must be a float in pixel units of [0, 1] images (e.g. 25/255) or a tensor [B], '
            f'got {type(sigma).__name__}')
    if isinstance(sigma, torch.Tensor):
        if sigma.dtype == torch.bool or sigma.is_complex():
            raise TypeError(f'sigma must be a real tensor, got dtype {sigma.dtype}')
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != batch_size):
            raise ValueError(
                f'sigma must be a float, a 0-d tensor or a tensor of shape [B]=[{batch_size}], '
                f'got shape {list(sigma.shape)}')
        sigma_t = sigma.detach().to(device=device, dtype=dtype).expand(batch_size)
    else:
        sigma_t = torch.full((batch_size,), float(sigma), device=device, dtype=dtype)
    if not bool(torch.isfinite(sigma_t).all()) or not bool((sigma_t > 0).all()):
        raise ValueError(f'sigma must be finite and > 0 (pixel units of [0, 1] images), got {sigma}')
    if bool((sigma_t > 1).any()):
        warnings.warn(
            f'sigma > 1 in pixel units of [0, 1] images (max {float(sigma_t.max()):.4g}): '
            f'did you mean sigma/255?', stacklevel=3)
    return sigma_t


def sample_sigma(
        batch_size: int,
        sigma_max: float,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Draw sigma = sigma_max * u^2, u ~ U(0, 1), one per image: most mass at low noise.

    Returns:
        sigma [B].
    """
    if sigma_max <= 0:
        raise ValueError(f'sigma_max must be > 0 (pixel units of [0, 1] images), got {sigma_max}')
    u = torch.rand(batch_size, generator=generator, device=device)
    return sigma_max * u * u


def _sample_key(seed: int, stream: int, epoch: int, index: int) -> np.random.SeedSequence:
    key = [int(seed), int(stream), int(epoch), int(index)]
    if min(key) < 0:
        raise ValueError(f'seed, stream, epoch and sample index must be >= 0, got {key}')
    return np.random.SeedSequence(key)


def sample_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 32-bit torch seed for one (seed, stream, epoch, sample index), hashed by numpy's SeedSequence.

    torch's CPU generator keeps only the low 32 bits of a seed, so the four numbers are hashed
    together rather than packed into one integer (packing lost the seed and the stream).
    """
    return int(_sample_key(seed, stream, epoch, index).generate_state(1, dtype=np.uint32)[0])


def _sample_rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    """A generator of its own for one (seed, stream, epoch, sample index).

    Not a torch.Generator: its Mersenne Twister keeps only the low 32 bits of a seed, so packing the
    four numbers into one seed made different streams, seeds and even epochs (all but the parity)
    draw the same noise. numpy's SeedSequence hashes the whole tuple into the generator's state.
    """
    return np.random.Generator(np.random.PCG64(_sample_key(seed, stream, epoch, index)))


def seeded_noise(
        indices: Union[torch.Tensor, Sequence[int]],
        shape: Tuple[int, int, int],
        *,
        sigma_max: Optional[float] = None,
        sigma: Optional[float] = None,
        seed: int = 0,
        epoch: int = 0,
        stream: int = STREAM_EVAL,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw per-sample noise levels and standard Gaussian noise, each from its own seeded generator.

    Exactly one of ``sigma_max`` (sigma = sigma_max * u^2 per image) and ``sigma`` (a fixed level)
    is given. The draws depend only on (seed, stream, epoch, sample index), not on the batch
    composition, the rank or the number of processes.

    Args:
        indices: Dataset indices of the samples, [B].
        shape: Image shape (C, H, W).
        sigma_max: Largest noise level of the squared-uniform distribution.
        sigma: A fixed noise level instead.
        seed: Run seed.
        epoch: Epoch (or pass) the samples are drawn in.
        stream: Which random stream (classification, denoising, evaluation).

    Returns:
        (sigma [B], eps [B, C, H, W]) on the CPU, in float32.
    """
    if (sigma_max is None) == (sigma is None):
        raise ValueError('give exactly one of sigma_max and sigma')
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    sigmas, eps = [], []
    for index in indices:
        rng = _sample_rng(seed, stream, epoch, index)
        u = rng.random()  # drawn either way, so that eps does not depend on how sigma is chosen
        sigmas.append(sigma_max * u * u if sigma_max is not None else float(sigma))
        eps.append(torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)))
    if not eps:
        return torch.zeros(0), torch.zeros((0, *shape))
    return torch.tensor(sigmas, dtype=torch.float32), torch.stack(eps)


def add_noise(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """y = x + sigma * eps with sigma [B] broadcast over [B, C, H, W]."""
    return x + sigma.to(x).view(-1, *([1] * (x.ndim - 1))) * eps.to(x)
