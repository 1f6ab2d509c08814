"""Samples from the learned prior: ``python -m timm_joint.sample`` (unconditional and class-conditional).

Two samplers draw images from p(y) (and from p(y | c) with the class-conditional denoiser):

* ``KSSampler``: the coarse-to-fine stochastic ascent of Kadkhodaie & Simoncelli (2021, "Solving linear
  inverse problems using the prior implicit in a denoiser", Algorithm 1). It needs only a *blind*
  denoiser: no noise schedule, since the residual d = D(y) - y estimates the noise level of the current
  iterate itself, sigma^2 = ||d||^2 / N. Starting from y_0 = mean + sigma_0 z, each step t is

      h_t      = h0 t / (1 + h0 (t - 1))                               (step size, growing to 1)
      d_t      = D(y_{t-1}) - y_{t-1},    sigma_t = ||d_t|| / sqrt(N)  (per image)
      gamma_t  = sqrt((1 - beta h_t)^2 - (1 - h_t)^2) * sigma_t        (noise injection)
      y_t      = y_{t-1} + h_t d_t + gamma_t z_t,     z_t ~ N(0, I)

  so that the effective noise level falls by the factor (1 - beta h_t) per step: beta = 1 is a
  deterministic ascent (no injected noise, which collapses towards the posterior mean), small beta
  injects more noise and samples better but takes more steps. A sample stops when its sigma_t falls
  below ``sigma_end``. With class labels the step uses D(y, c) = D(y) + sigma^2 grad log p(c | y),
  which needs sigma: the step's predicted noise level, (1 - beta h_{t-1}) sigma_{t-1} (sigma_0 at the
  first step), so each step costs one call of the denoiser.
* ``diffusion_sample``: deepinv's diffusion sampler (``PosteriorDiffusion`` without data, on a variance
  exploding SDE, solved by its DDPM/DDIM ancestral solvers) through ``DeepinvAdapter``. The SDE fixes the
  noise schedule; the blind denoiser ignores the sigma it is told, the conditional one uses it.

The sampler check (``GaussianTextureDenoiser``, ``spectrum_error_db``): on stationary Gaussian textures
(``timm_joint.textures``) the exact MMSE denoiser is a Wiener filter, made blind here by a
maximum-likelihood estimate of the noise level, and the samples' mean radial power spectrum must match the
true one. The tests run it with the exact denoiser, with deliberately wrong step rules (which must fail
it), and with a small model trained briefly on textures.

Command line (noise levels in the 0-255 convention)::

    python -m timm_joint.sample --model local-dir:runs/quickstart/export/best --out runs/quickstart/samples \\
        --samplers ks diffusion --per-class 4 --unconditional 8 --seed 0

writes OUT/results.json (schema_version 1, kind "samples": parameters, steps, final noise levels and
the rate at which the model's own classifier recognises the class of each class-conditional sample),
OUT/results.md (its tables), OUT/samples.png (one row per sampler and class) and OUT/samples.pt (the
sample tensors).
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import textures
from .cli import add_output_args, check_out_dir, parse_command, program_name, run_or_exit
from .io import atomic_file, atomic_write, load_model
from .prior import DeepinvAdapter
from .protocol import is_denoiser, is_joint

__all__ = [
    'KSSampler', 'SampleOutput', 'diffusion_sample', 'GaussianTextureDenoiser', 'radial_power',
    'spectrum_error_db', 'sample_command', 'render_markdown', 'build_parser', 'parse_args', 'run', 'main',
]

SCHEMA_VERSION = 1
DenoiserLike = Union[nn.Module, Callable[..., torch.Tensor]]


def _as_denoiser(denoiser: DenoiserLike) -> DenoiserLike:
    """A deepinv-style denoiser ``D(x, sigma, **kw)``: timm_joint models are wrapped in ``DeepinvAdapter``."""
    if isinstance(denoiser, nn.Module) and callable(getattr(denoiser, 'denoise', None)) \
            and not isinstance(denoiser, DeepinvAdapter):
        return DeepinvAdapter(denoiser)
    if not callable(denoiser):
        raise TypeError(f'expected a denoiser D(x, sigma) (a deepinv Denoiser or a timm_joint model), '
                        f'got {type(denoiser).__name__}')
    return denoiser


@dataclass
class SampleOutput:
    """What a sampler returns.

    Attributes:
        samples: The samples [B, C, H, W] (not clamped).
        sigmas: The noise level estimated at each step, [T, B] (NaN once a sample has stopped).
        steps: Steps taken by each sample, [B].
        step_sizes: h_t for t = 1..T.
        diverged: Samples stopped because their noise estimate left the range (non-finite, or above
            ``KSSampler.DIVERGED`` times sigma_start), [B] bool; they keep their last finite state.
    """
    samples: torch.Tensor
    sigmas: torch.Tensor
    steps: torch.Tensor
    step_sizes: List[float] = field(default_factory=list)
    diverged: Optional[torch.Tensor] = None


class KSSampler:
    """Kadkhodaie-Simoncelli coarse-to-fine stochastic ascent with a blind denoiser (see the module doc).

    Args:
        denoiser: ``D(x, sigma, **kw)``: a ``DeepinvAdapter``, any deepinv denoiser, or a timm_joint model
            (wrapped). It is called with the step's predicted noise level, which a blind one ignores.
        h0: Initial step size h_1, in (0, 1].
        beta: Noise-injection control in (0, 1]: the noise level falls by (1 - beta h_t) per step;
            1 injects no noise (a deterministic ascent).
        sigma_start: Noise level sigma_0 of the initial image mean + sigma_0 z (pixel units of [0, 1]).
        sigma_end: Stop a sample once its estimated noise level is below this (pixel units).
        max_steps: Stop every sample after this many steps.
        mean: Mean of the initial image: a float or one value per channel.
        final_denoise: Return D(y_T) instead of y_T (removes the last sigma_end of noise, and with it
            some detail).

    Example:
        >>> import torch
        >>> from timm_joint.sample import KSSampler, GaussianTextureDenoiser
        >>> sampler = KSSampler(GaussianTextureDenoiser('pink', 16), h0=0.05, beta=0.5, sigma_start=0.3,
        ...                     sigma_end=0.01)
        >>> out = sampler.sample((4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
        >>> out.samples.shape, bool((out.steps > 10).all())
        (torch.Size([4, 3, 16, 16]), True)
    """

    def __init__(
            self,
            denoiser: DenoiserLike,
            *,
            h0: float = 0.01,
            beta: float = 0.5,
            sigma_start: float = 100 / 255,
            sigma_end: float = 2 / 255,
            max_steps: int = 1000,
            mean: Union[float, Sequence[float]] = 0.5,
            final_denoise: bool = False,
    ):
        if not 0 < h0 <= 1:
            raise ValueError(f'h0 must be in (0, 1], got {h0}')
        if not 0 < beta <= 1:
            raise ValueError(f'beta must be in (0, 1] (1: no noise injection), got {beta}')
        if not (0 < sigma_end < sigma_start):
            raise ValueError(f'expected 0 < sigma_end < sigma_start (pixel units of [0, 1] images), '
                             f'got sigma_start={sigma_start}, sigma_end={sigma_end}')
        if int(max_steps) < 1:
            raise ValueError(f'max_steps must be >= 1, got {max_steps}')
        self.denoiser = _as_denoiser(denoiser)
        self.h0, self.beta = float(h0), float(beta)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.max_steps = int(max_steps)
        self.mean = mean
        self.final_denoise = final_denoise

    # A sample whose estimated noise level grows past this multiple of sigma_start (or is not finite) has
    # left the ascent: the denoiser amplifies it instead of removing noise. It is stopped and reported.
    DIVERGED = 4.

    def step_size(self, t: int) -> float:
        """h_t = h0 t / (1 + h0 (t - 1)), t >= 1: small steps while the image is mostly noise."""
        return self.h0 * t / (1 + self.h0 * (t - 1))

    def noise_std(self, sigma: torch.Tensor, h: float) -> torch.Tensor:
        """Std of the injected noise, gamma_t = sqrt((1 - beta h)^2 - (1 - h)^2) sigma_t, [B]: after the step
        y + h d (noise left: (1 - h) sigma), the noise level is (1 - beta h) sigma."""
        return math.sqrt(max((1 - self.beta * h) ** 2 - (1 - h) ** 2, 0.)) * sigma

    def _init(self, shape: Sequence[int], generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
        if len(shape) != 4:
            raise ValueError(f'expected a sample shape (B, C, H, W), got {tuple(shape)}')
        z = torch.randn(*shape, generator=generator, device='cpu', dtype=torch.float64).to(device=device, dtype=dtype)
        mean = torch.as_tensor(self.mean, dtype=dtype, device=device).reshape(-1)
        if mean.numel() not in (1, shape[1]):
            raise ValueError(f'mean must be a float or one value per channel ({shape[1]}), got {self.mean}')
        return mean.view(1, -1, 1, 1) + self.sigma_start * z

    @torch.no_grad()
    def sample(
            self,
            shape: Sequence[int],
            *,
            class_labels: Optional[Union[int, torch.Tensor]] = None,
            generator: Optional[torch.Generator] = None,
            device: Union[str, torch.device] = 'cpu',
            dtype: torch.dtype = torch.float32,
            progress: bool = False,
            desc: str = 'sampling',
    ) -> SampleOutput:
        """Draw B samples.

        Args:
            shape: (B, C, H, W).
            class_labels: Classes for the conditional denoiser: an int or a LongTensor [B]; None: p(y).
            generator: CPU generator for the initial image and the injected noise (reproducible samples).
            device: Where the images live.
            dtype: Their dtype.
            progress: Show a tqdm bar (on stderr) with the largest noise level left.
            desc: The bar's label.

        Returns:
            A ``SampleOutput``.
        """
        y = self._init(shape, generator, device, dtype)
        b = y.shape[0]
        n = y[0].numel()
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(b).clone()
        sigma_pred = torch.full((b,), self.sigma_start, device=device, dtype=torch.float64)
        active = torch.ones(b, dtype=torch.bool, device=device)
        steps = torch.zeros(b, dtype=torch.long)
        diverged = torch.zeros(b, dtype=torch.bool)
        history, sizes = [], []
        from tqdm import tqdm
        bar = tqdm(total=None, desc=desc, disable=not progress, file=sys.stderr, unit='step')
        try:
            for t in range(1, self.max_steps + 1):
                idx = active.nonzero()[:, 0]
                y_a = y[idx]
                kw = {} if labels is None else {'class_labels': labels[idx]}
                d = self.denoiser(y_a, sigma_pred[idx].to(dtype), **kw) - y_a
                sigma = d.double().flatten(1).norm(dim=1) / math.sqrt(n)
                row = torch.full((b,), float('nan'), dtype=torch.float64)
                bad = ~torch.isfinite(sigma) | (sigma > self.DIVERGED * self.sigma_start)
                diverged[idx[bad].cpu()] = True
                sigma = torch.where(bad, torch.zeros_like(sigma), sigma)
                row[idx.cpu()] = sigma.cpu()
                row[idx[bad].cpu()] = float('nan')
                history.append(row)
                done = (sigma < self.sigma_end) | bad
                if bool(done.all()):
                    active[idx] = False
                    break
                h = self.step_size(t)
                sizes.append(h)
                gamma = self.noise_std(sigma, h)
                z = torch.randn(y_a.shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
                step = h * d + gamma.to(dtype).view(-1, 1, 1, 1) * z
                keep = idx[~done]
                y[keep] = y_a[~done] + step[~done]
                steps[keep.cpu()] += 1
                active[idx[done]] = False
                sigma_pred[idx] = (1 - self.beta * h) * sigma
                bar.update(1)
                bar.set_postfix(sigma_255=f'{255 * float(sigma.max()):.2f}', active=int(active.sum()))
                if not bool(active.any()):
                    break
        finally:
            bar.close()
        if self.final_denoise:
            kw = {} if labels is None else {'class_labels': labels}
            y = self.denoiser(y, sigma_pred.to(dtype).clamp_min(1e-6), **kw)
        sigmas = torch.stack(history) if history else torch.zeros(0, b, dtype=torch.float64)
        return SampleOutput(samples=y, sigmas=sigmas, steps=steps, step_sizes=sizes, diverged=diverged)


def diffusion_sample(
        denoiser: DenoiserLike,
        shape: Sequence[int],
        *,
        class_labels: Optional[Union[int, torch.Tensor]] = None,
        sigma_max: float = 100 / 255,
        sigma_min: float = 2 / 255,
        num_steps: int = 100,
        solver: str = 'ddpm',
        seed: int = 0,
        device: Union[str, torch.device] = 'cpu',
        progress: bool = False,
) -> torch.Tensor:
    """Samples from deepinv's diffusion sampler (variance-exploding SDE, ancestral solver), no data.

    deepinv carries the state in [-1, 1] and wraps the denoiser so that it sees [0, 1] images and
    sigma / 2; here sigma_max and sigma_min are in pixel units of [0, 1] images, as everywhere in Python.
    The solver's time steps are spaced uniformly in t on the SDE's geometric sigma(t), and the last
    step returns the denoised estimate.

    Args:
        denoiser: A ``DeepinvAdapter`` or a timm_joint model (wrapped).
        shape: (B, C, H, W).
        class_labels: An int or a LongTensor [B] for p(y | c) (passed to the denoiser as deepinv's
            ``class_labels``); None for p(y).
        sigma_max: Noise level at the start (pixel units).
        sigma_min: Noise level at the end (pixel units).
        num_steps: Solver steps (denoiser calls).
        solver: 'ddpm' (stochastic, ancestral) or 'ddim' (deterministic).
        seed: Seed of the solver's generator.
        device: Device.
        progress: deepinv's progress bar.

    Returns:
        Samples [B, C, H, W] in [0, 1] units (not clamped).
    """
    import deepinv as dinv
    if solver not in ('ddpm', 'ddim'):
        raise ValueError(f"solver must be 'ddpm' or 'ddim', got {solver!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'expected 0 < sigma_min < sigma_max (pixel units), got {sigma_min}, {sigma_max}')
    if int(num_steps) < 2:
        raise ValueError(f'num_steps must be >= 2, got {num_steps}')
    den = _as_denoiser(denoiser)
    rng = torch.Generator(device=device).manual_seed(int(seed))
    timesteps = torch.linspace(1, 0, int(num_steps), dtype=torch.float64)
    solver_cls = dinv.sampling.DDPMSolver if solver == 'ddpm' else dinv.sampling.DDIMSolver
    # In [-1, 1] units the noise levels double; t = 0 maps to sigma_min, the level of the last state.
    sde = dinv.sampling.VarianceExplodingDiffusion(sigma_min=2 * sigma_min, sigma_max=2 * sigma_max, device=device)
    sampler = dinv.sampling.PosteriorDiffusion(
        data_fidelity=None, denoiser=den, sde=sde, solver=solver_cls(timesteps=timesteps, rng=rng),
        device=device, verbose=progress, minus_one_one=True)
    kw = {}
    if class_labels is not None:
        kw['class_labels'] = torch.as_tensor(class_labels, device=device).reshape(-1).expand(shape[0]).clone()
    out = sampler(y=None, physics=None, x_init=tuple(shape), seed=int(seed), **kw)
    return out.float()


# -- the sampler check: Gaussian textures with a known spectrum ---------------------------------------

class GaussianTextureDenoiser(nn.Module):
    """The exact MMSE denoiser of a stationary Gaussian texture (``timm_joint.textures``), blind.

    A texture x = mean + std * M z has, in the colour eigenbasis of M M^T, independent channels with power
    spectra std^2 lambda_k P(f); the posterior mean of x given y = x + sigma eps is the Wiener filter
    std^2 lambda_k P / (std^2 lambda_k P + sigma^2) in each. When sigma is not given (or ``blind``), it
    is estimated per image by maximum likelihood from y's periodogram (the exact Gaussian likelihood of
    ``textures.bayes_log_likelihood``, maximised over sigma by bisection on its derivative).

    Args:
        kind: A texture kind (``textures.KINDS``).
        size: Image size (square, periodic fields).
        mean: Pixel mean of the textures.
        std: Pixel std of the textures.
        blind: Ignore a given sigma and always estimate it.

    Example:
        >>> import numpy as np, torch
        >>> from timm_joint import textures
        >>> den = GaussianTextureDenoiser('pink', 32)
        >>> x = torch.from_numpy(textures.sample('pink', 8, 32, rng=np.random.default_rng(0))).float()
        >>> y = x + 0.1 * torch.randn_like(x)
        >>> round(float(den.estimate_sigma(y).mean()), 2)
        0.1
    """

    def __init__(self, kind: str, size: int, *, mean: float = 0.5, std: float = 0.1, blind: bool = True):
        super().__init__()
        p = textures.spectrum(kind, size)  # validates kind
        lam, vec = np.linalg.eigh(textures.COLOUR_MIX @ textures.COLOUR_MIX.T)
        self.kind, self.size, self.mean, self.std, self.blind = kind, int(size), float(mean), float(std), blind
        self.register_buffer('basis', torch.as_tensor(vec.T, dtype=torch.float64))  # rows: eigenvectors
        power = std ** 2 * lam[:, None, None] * p[None]  # [3, H, W]: each decorrelated channel's spectrum
        self.register_buffer('signal_power', torch.as_tensor(power, dtype=torch.float64))

    def _check(self, y: torch.Tensor) -> None:
        if y.ndim != 4 or y.shape[1] != 3 or y.shape[-1] != self.size or y.shape[-2] != self.size:
            raise ValueError(f'expected textures [B, 3, {self.size}, {self.size}], got {list(y.shape)}')

    def _coefficients(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.einsum('ki,nihw->nkhw', self.basis, y.double() - self.mean)
        return torch.fft.fft2(z)

    def estimate_sigma(self, y: torch.Tensor, iters: int = 20) -> torch.Tensor:
        """Maximum-likelihood noise level of each image, [B] (pixel units).

        The periodogram coefficients are independent with variances v = a + sigma^2 (a: the signal's);
        Fisher scoring on sigma^2, sigma^2 += sum((p - v) / v^2) / sum(1 / v^2), from the total power.
        """
        self._check(y)
        power = self._coefficients(y).abs().pow(2) / (self.size * self.size)  # [B, 3, H, W]
        a = self.signal_power
        s2 = power.mean((1, 2, 3))
        for _ in range(iters):
            v = a + s2.view(-1, 1, 1, 1)
            s2 = (s2 + ((power - v) / v.pow(2)).sum((1, 2, 3)) / v.pow(-2).sum((1, 2, 3))).clamp_min(1e-12)
        return s2.sqrt().to(y.dtype)

    def forward(self, y: torch.Tensor, sigma: Any = None, **kwargs: Any) -> torch.Tensor:
        """The posterior mean E[x | y], [B, 3, H, W]; sigma (pixel units) is used only when not blind."""
        self._check(y)
        if self.blind or sigma is None:
            s2 = self.estimate_sigma(y).double().pow(2)
        else:
            s2 = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1).expand(y.shape[0]).pow(2)
        gain = self.signal_power / (self.signal_power + s2.view(-1, 1, 1, 1))
        z = torch.fft.ifft2(self._coefficients(y) * gain).real
        return (torch.einsum('ki,nkhw->nihw', self.basis, z) + self.mean).to(y.dtype)


def radial_power(x: torch.Tensor, mean: float = 0.5) -> Dict[str, np.ndarray]:
    """Mean radial power spectrum of square images [B, C, H, H] (over images and channels).

    The power of a field of pixel variance v sums to v over frequencies (periodogram / number of pixels),
    the convention of ``textures.spectrum``.

    Returns:
        ``textures.radial_profile``'s dict: 'freq' (cycles per pixel) and 'power'.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f'expected square images [B, C, H, H], got {list(x.shape)}')
    size = x.shape[-1]
    power = torch.fft.fft2(x.double() - mean).abs().pow(2) / (size * size)
    return textures.radial_profile(power.cpu().numpy())


def spectrum_error_db(
        samples: torch.Tensor,
        kind: str,
        *,
        std: float = 0.1,
        mean: float = 0.5,
        band: Tuple[float, float] = (0., 0.5),
) -> Dict[str, Any]:
    """Compare the samples' mean radial power spectrum with the true one of a texture kind, in dB.

    The true spectrum of every channel is std^2 P(f) (the colour mixing has unit-norm rows).

    Args:
        samples: Square samples [B, 3, H, H].
        kind: The texture kind they should follow.
        std: Pixel std of the textures.
        mean: Pixel mean.
        band: Rings whose centre frequency (cycles per pixel) is in [lo, hi] are compared.

    Returns:
        dict: 'freq', 'sample_db', 'true_db', 'error_db' (sample - true, per ring in the band) and
        'max_abs_error_db'.
    """
    size = samples.shape[-1]
    got = radial_power(samples, mean=mean)
    true = textures.radial_profile(std ** 2 * textures.spectrum(kind, size)[None])
    if not np.allclose(got['freq'], true['freq']):  # pragma: no cover - same grid by construction
        raise RuntimeError('ring frequencies differ')
    m = (got['freq'] >= band[0]) & (got['freq'] <= band[1])
    if not m.any():
        raise ValueError(f'no ring of the {size} px grid lies in the band {band}')
    sample_db = 10 * np.log10(got['power'][m])
    true_db = 10 * np.log10(true['power'][m])
    err = sample_db - true_db
    return {'freq': got['freq'][m], 'sample_db': sample_db, 'true_db': true_db, 'error_db': err,
            'max_abs_error_db': float(np.abs(err).max())}


# -- the command -------------------------------------------------------------------------------------

SAMPLERS = ('ks', 'diffusion')


def _check_args(args: argparse.Namespace) -> None:
    for s in args.samplers:
        if s not in SAMPLERS:
            raise ValueError(f'unknown sampler {s!r}: expected some of {SAMPLERS}')
    # --sigma-start defaults to the model's training range: checked once the model is loaded.
    if args.sigma_start is not None and not 0 < args.sigma_end < args.sigma_start:
        raise ValueError(f'expected 0 < --sigma-end < --sigma-start (0-255 units), '
                         f'got {args.sigma_end}, {args.sigma_start}')
    if args.unconditional < 0 or args.per_class < 0:
        raise ValueError('--unconditional and --per-class must be >= 0')
    if args.batch_size < 1:
        raise ValueError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.img_size is not None and args.img_size < 8:
        raise ValueError(f'--img-size must be >= 8 px, got {args.img_size}')


def _chunks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _ks_run(den: DeepinvAdapter, n: int, labels: Optional[torch.Tensor], args: argparse.Namespace,
            img: Tuple[int, int, int], seed: int, desc: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
    sampler = KSSampler(den, h0=args.h0, beta=args.beta, sigma_start=args.sigma_start / 255.,
                        sigma_end=args.sigma_end / 255., max_steps=args.max_steps, mean=args.mean,
                        final_denoise=args.final_denoise)
    out, steps, final, diverged = [], [], [], []
    for i, (a, b) in enumerate(_chunks(n, args.batch_size)):
        g = torch.Generator().manual_seed(seed + i)
        res = sampler.sample((b - a, *img), class_labels=None if labels is None else labels[a:b], generator=g,
                             device=args.device, progress=args.progress, desc=desc)
        out.append(res.samples.cpu())
        steps.append(res.steps)
        last = torch.stack([col[~col.isnan()][-1] if (~col.isnan()).any() else col[0] for col in res.sigmas.T])
        final.append(last)
        diverged.append(res.diverged)
    steps_t, final_t, diverged_t = torch.cat(steps).double(), torch.cat(final), torch.cat(diverged)
    ok = ~diverged_t
    return torch.cat(out), {'steps_mean': float(steps_t.mean()), 'steps_max': int(steps_t.max()),
                            'final_sigma_255_mean': float(255 * final_t[ok].mean()) if ok.any() else None,
                            'diverged': int(diverged_t.sum())}


def _diffusion_run(den: DeepinvAdapter, n: int, labels: Optional[torch.Tensor], args: argparse.Namespace,
                   img: Tuple[int, int, int], seed: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
    out = []
    for i, (a, b) in enumerate(_chunks(n, args.batch_size)):
        out.append(diffusion_sample(den, (b - a, *img), class_labels=None if labels is None else labels[a:b],
                                    sigma_max=args.sigma_start / 255., sigma_min=args.sigma_end / 255.,
                                    num_steps=args.diffusion_steps, solver=args.diffusion_solver, seed=seed + i,
                                    device=args.device, progress=args.progress).cpu())
    return torch.cat(out), {'steps': args.diffusion_steps}


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([model(x[a:b].clamp(0, 1).to(device)).argmax(-1).cpu()
                      for a, b in _chunks(x.shape[0], batch_size)])


def sample_command(args: argparse.Namespace) -> Dict[str, Any]:
    """Draw the samples ``args`` describes; write results.json, samples.png and samples.pt.

    Returns:
        The results dictionary.
    """
    from . import figures

    from .evaluate import read_training_sigma_max

    check_out_dir(args.out, '--out')
    out_dir = Path(args.out)
    results_path = out_dir / 'results.json'
    if results_path.exists() and not args.overwrite:
        raise FileExistsError(f'{results_path} exists: refusing to overwrite it (pass --overwrite, or another --out)')
    _check_args(args)  # before the model loads
    t0 = time.time()
    model, info = load_model(args.model, args.checkpoint, num_classes=args.num_classes, device=args.device)
    training = read_training_sigma_max(info.get('folder'))
    if args.sigma_start is None:
        args.sigma_start = float(training['sigma_max_255'] or 100.)
        args.sigma_start_source = training['source'] if training['sigma_max_255'] else 'default (100)'
    else:
        args.sigma_start_source = '--sigma-start'
    _check_args(args)
    if not is_denoiser(model):
        raise ValueError(f'{args.model!r} has no denoiser (a plain classifier): sampling needs a timm_joint model')
    den = DeepinvAdapter(model, guidance=args.guidance)
    conditional = is_joint(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    in_chans = int(getattr(model, 'in_chans', 3))
    size = args.img_size or int((cfg.get('input_size') or (3, 32, 32))[-1])
    img = (in_chans, size, size)
    classes = list(range(den.num_classes)) if args.classes is None else list(args.classes)
    if classes and not conditional:
        if args.classes is not None:
            raise ValueError(
                f'{args.model!r} has no classifier: class-conditional sampling (--classes) is not available')
        classes = []
    bad = [c for c in classes if not 0 <= c < den.num_classes]
    if bad:
        raise ValueError(f'--classes {bad} out of range: expected 0 <= c < {den.num_classes}')

    rows: Dict[str, torch.Tensor] = {}
    tensors: Dict[str, torch.Tensor] = {}
    per_sampler: Dict[str, Any] = {}
    for s_i, name in enumerate(args.samplers):
        entry: Dict[str, Any] = {'params': _sampler_params(name, args)}
        groups = [('unconditional', args.unconditional, None)]
        if classes and args.per_class:
            labels = torch.tensor(classes).repeat_interleave(args.per_class)
            groups.append(('conditional', labels.numel(), labels))
        for g_i, (group, n, labels) in enumerate(groups):
            if n == 0:
                continue
            seed = args.seed + 1000 * s_i + 100 * g_i
            if name == 'ks':
                x, stats = _ks_run(den, n, labels, args, img, seed, desc=f'ks {group}')
            else:
                x, stats = _diffusion_run(den, n, labels, args, img, seed)
            stats['num_samples'] = n
            stats['seed'] = seed
            tensors[f'{name}_{group}'] = x
            if conditional:
                pred = _predict(model, x, args.batch_size, args.device)
                stats['predicted_classes'] = {str(c): int((pred == c).sum()) for c in range(den.num_classes)}
                if labels is not None:
                    tensors[f'{name}_{group}_labels'] = labels
                    hit = (pred == labels).double()
                    stats['classes'] = classes
                    stats['recognised'] = 100. * float(hit.mean())
                    stats['recognised_per_class'] = {str(c): 100. * float(hit[labels == c].mean()) for c in classes}
            entry[group] = stats
            if labels is None:
                rows[f'{name}: p(y)'] = x
            else:
                for c in classes:
                    rows[f'{name}: c={c}'] = x[labels == c]
        per_sampler[name] = entry

    results: Dict[str, Any] = {
        'schema_version': SCHEMA_VERSION,
        'kind': 'samples',
        'model': {'name': args.model, 'checkpoint': args.checkpoint or info.get('folder') or info.get('source'),
                  'architecture': info.get('architecture'), 'num_params': info['num_params'],
                  'num_classes': den.num_classes, 'blind': den.blind},
        'img_size': size,
        'training_sigma_max_255': training['sigma_max_255'],
        'seed': args.seed,
        'units': {'sigma': '0-255', 'recognised': '% of class-conditional samples classified as their class'},
        'samplers': per_sampler,
    }
    shown = ('h0', 'beta', 'steps', 'solver', 'guidance')
    title = ', '.join(f'{k}: ' + ' '.join(f'{a}={b}' for a, b in v['params'].items() if a in shown)
                      for k, v in per_sampler.items())
    fig = figures.sample_grid(rows, out_dir / 'samples.png',
                              title=f'sigma {args.sigma_start:g} -> {args.sigma_end:g} (0-255); {title}')
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / 'samples.pt') as tmp:
        torch.save(tensors, tmp)
    results['figures'] = [str(fig.relative_to(out_dir))]
    results['wall_s'] = round(time.time() - t0, 2)
    results['command'] = args.command
    atomic_write(out_dir / 'results.md', render_markdown(results), overwrite=True)
    atomic_write(results_path, json.dumps(results, indent=2, allow_nan=False) + '\n', overwrite=args.overwrite)
    return results


def _sampler_params(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    common = {'sigma_start': args.sigma_start, 'sigma_start_source': getattr(args, 'sigma_start_source', None),
              'sigma_end': args.sigma_end, 'guidance': args.guidance}
    if name == 'ks':
        return dict(common, h0=args.h0, beta=args.beta, max_steps=args.max_steps, mean=args.mean,
                    final_denoise=args.final_denoise,
                    rule='h_t = h0 t / (1 + h0 (t - 1)); sigma_t = ||D(y) - y|| / sqrt(N); '
                         'gamma_t = sqrt((1 - beta h_t)^2 - (1 - h_t)^2) sigma_t')
    return dict(common, steps=args.diffusion_steps, solver=args.diffusion_solver,
                sde='deepinv VarianceExplodingDiffusion (PosteriorDiffusion without data)')


def render_markdown(results: Dict[str, Any]) -> str:
    """Markdown summary of sampling results: steps, final noise levels and recognition rates."""
    r = results
    m = r['model']
    lines = [f'# Samples from `{m["name"]}`', '',
             f'- {m["num_params"]:,} parameters, {r["img_size"]} px, seed {r["seed"]}; noise levels in 0-255 units', '',
             '| sampler | group | samples | steps (mean) | final sigma (mean) | diverged | recognised (%) |',
             '|---|---|---:|---:|---:|---:|---:|']
    for name, entry in r['samplers'].items():
        for group in ('unconditional', 'conditional'):
            s = entry.get(group)
            if not s:
                continue
            steps = s.get('steps_mean', s.get('steps'))
            final = s.get('final_sigma_255_mean')
            rec = s.get('recognised')
            div = s.get('diverged')
            lines.append(f'| {name} | {group} | {s["num_samples"]} | {steps:.1f} | '
                         f'{"" if final is None else f"{final:.2f}"} | {"" if div is None else div} | '
                         f'{"" if rec is None else f"{rec:.1f}"} |')
    lines.append('')
    for name, entry in r['samplers'].items():
        lines.append(f'- {name}: ' + ', '.join(f'{k}={v}' for k, v in entry['params'].items()))
    if r.get('figures'):
        lines += ['', '## Figures', ''] + [f'![{Path(f).stem}]({f})' for f in r['figures']]
    return '\n'.join(lines).rstrip() + '\n'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name('timm_joint.sample'),
        description='Unconditional and class-conditional samples from a joint model: the Kadkhodaie-Simoncelli '
                    'ascent with its blind / class-conditional denoiser, and deepinv\'s diffusion sampler. '
                    'Noise levels in 0-255 units.')
    p.add_argument('--model', required=True,
                   help='local-dir:PATH (an export of train_joint.py), hf-hub: or a registry name')
    p.add_argument('--checkpoint', default=None, help='export folder or state-dict file for --model')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--samplers', nargs='+', default=list(SAMPLERS), help=f'some of {SAMPLERS}')
    p.add_argument('--unconditional', type=int, default=8, help='samples from p(y) per sampler')
    p.add_argument('--classes', type=int, nargs='*', default=None, help='classes for p(y | c) (default: all)')
    p.add_argument('--per-class', type=int, default=4, help='samples per class (0: none)')
    p.add_argument('--img-size', type=int, default=None, help="sample size (default: the model's input size)")
    p.add_argument('--sigma-start', type=float, default=None,
                   help="initial noise level (0-255); default: the model's largest training noise level when its "
                        "export records it, else 100 (a denoiser is not trusted beyond its training range)")
    p.add_argument('--sigma-end', type=float, default=2., help='final noise level (0-255)')
    p.add_argument('--h0', type=float, default=0.01, help='ks: first step size')
    p.add_argument('--beta', type=float, default=0.5, help='ks: noise injection (1: none)')
    p.add_argument('--max-steps', type=int, default=1000, help='ks: step limit')
    p.add_argument('--mean', type=float, default=0.5, help='ks: mean of the initial image')
    p.add_argument('--final-denoise', action='store_true', help='ks: return D(y_T) instead of y_T')
    p.add_argument('--guidance', type=float, default=1.0, help='weight of the class term in D(y, c)')
    p.add_argument('--diffusion-steps', type=int, default=100)
    p.add_argument('--diffusion-solver', choices=('ddpm', 'ddim'), default='ddpm')
    p.add_argument('--batch-size', type=int, default=64)
    add_output_args(p, 'runs/samples')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), 'timm_joint.sample', argv)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` and sample; bad input raises (ValueError, TypeError, FileExistsError)."""
    return sample_command(parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: bad input exits with status 2 and a one-line error."""
    args = parse_args(argv)
    results = run_or_exit('timm_joint.sample', lambda: sample_command(args))
    print(render_markdown(results))
    out = Path(args.out)
    print(f'wrote {out / "results.json"}, {out / "samples.png"} and {out / "samples.pt"}')


if __name__ == '__main__':
    main()
