"""Plug-and-play restoration with the learned prior: ``python -m timm_joint.restore``.

Three linear inverse problems, each with Gaussian measurement noise, built from deepinv's physics:

* ``deblur``: Gaussian blur (``BlurFFT``, circular boundaries; kernel std ``--blur-sigma`` pixels);
* ``sr``: 4x super-resolution (``Downsampling``, bicubic anti-aliasing filter, circular boundaries);
* ``inpaint``: random inpainting (``Inpainting``, 50 % of the pixels missing, the same in every channel).

Each is solved by a deepinv plug-and-play algorithm with every model given as the prior, through
``timm_joint.prior.DeepinvAdapter``:

* ``hqs`` (default): half-quadratic splitting with the ``PnP`` prior, DPIR-style (Zhang et al., 2021):
  x_{k+1} = D(prox_{gamma_k f}(x_k)) with f = 0.5 ||A x - y||^2, a denoiser level sigma_k that falls
  geometrically from ``--sigma-hi`` to the measurement noise, and gamma_k = (sigma_k / sigma_n)^2 / mu
  (mu = 0.23, sigma_n floored at 0.01 as in DPIR). A non-blind prior (DRUNet) denoises at sigma_k;
  a blind one (GradResNet, DnCNN) ignores sigma_k and removes what it perceives as noise in the
  current iterate, so for it the schedule only sets how strongly each iterate is pulled back to the
  measurement.
* ``red``: proximal gradient with a gradient step on the prior first (``PGD``, ``g_first``):
  x_{k+1} = prox_{gamma f}(x_k - gamma lambda (x_k - D(x_k))), at a fixed sigma = the measurement
  noise. For the joint models the prior is ``GradientStepPrior`` (RED's gradient is grad E, so the
  objective f + lambda E is explicit and deepinv tracks it); for the baselines, deepinv's ``RED``.

Every prior starts from the same image: the measurement's simplest image-space estimate, which is also
the "measurement" row of the tables: y itself (deblurring), its bicubic upsampling (super-resolution),
y with the missing pixels set to the mean of the observed ones (inpainting).

Images are photographs none of the models saw in training (the quickstart data are cut from ten other
scikit-image pictures): scikit-learn's two sample photographs and scikit-image's stereo motorcycle, coins
and moon (the grey ones as three equal channels), resized so that their shorter side is 256 px (the
scale of the quickstart patches) and centre-cropped to each ``--sizes`` (the model's size and larger).

Outputs, in ``--out``: ``results.json`` (schema_version 1, kind "restoration": PSNR/SSIM per problem,
prior and measurement noise level, noise keys as strings in 0-255 units, also per image size),
``results.md`` (its tables) and ``figures/restoration.png`` (clean, measurement, each prior's
reconstruction). An existing results.json is never replaced without ``--overwrite``.

Example::

    python -m timm_joint.restore --models local-dir:runs/quickstart/export/best \\
        local-dir:runs/drunet-qs/export/best --labels joint drunet --noise 5 --out runs/restore
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .cli import add_output_args, check_out_dir, parse_command, program_name, run_or_exit
from .io import atomic_write, load_model
from .prior import DeepinvAdapter, GradientStepPrior
from .protocol import has_energy, is_blind, is_denoiser
from .robustness import level_key

__all__ = [
    'PROBLEMS', 'HELD_OUT_IMAGES', 'held_out_images', 'make_physics', 'measurement_estimate', 'build_solver',
    'dpir_schedule', 'restore', 'validate_results', 'render_markdown', 'build_parser', 'parse_args',
    'run', 'main',
]

SCHEMA_VERSION = 1
PROBLEMS = ('deblur', 'sr', 'inpaint')
# Photographs shipped with scikit-learn and scikit-image that are not among the quickstart's ten
# (timm_joint.data.QUICKSTART_IMAGES; skimage's 'cat' is 'chelsea', so it is left out).
HELD_OUT_IMAGES = ('china', 'flower', 'motorcycle', 'coins', 'moon')
DPIR_MU = 0.23


# -- images ------------------------------------------------------------------------------------------

def _load_photo(name: str) -> np.ndarray:
    """One held-out photograph as uint8 [H, W, 3]."""
    if name in ('china', 'flower'):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as e:
            raise ImportError(f'the held-out photograph {name!r} ships with scikit-learn: pip install -e ".[prior]" '
                              f'(or pip install scikit-learn)') from e
        img = load_sample_image(f'{name}.jpg')
    else:
        import skimage.data
        sources = {'motorcycle': lambda: skimage.data.stereo_motorcycle()[0], 'coins': skimage.data.coins,
                   'moon': skimage.data.moon}
        if name not in sources:
            raise ValueError(f'unknown image {name!r}: expected some of {HELD_OUT_IMAGES}')
        img = sources[name]()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def held_out_images(size: int, names: Sequence[str] = HELD_OUT_IMAGES, *, short_side: int = 256) -> torch.Tensor:
    """Centre crops of the held-out photographs, [N, 3, size, size] in [0, 1].

    Each photograph is resized (anti-aliased) so that its shorter side is ``short_side``, then cropped.
    """
    from skimage.transform import resize
    if size < 1 or size > short_side:
        raise ValueError(f'image size must be in [1, {short_side}] (the photographs are resized to a '
                         f'{short_side} px shorter side), got {size}')
    out = []
    for name in names:
        img = _load_photo(name)
        h, w = img.shape[:2]
        s = short_side / min(h, w)
        img = resize(img, (round(h * s), round(w * s)), anti_aliasing=True, preserve_range=True).round().clip(0, 255)
        h, w = img.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        crop = img[top:top + size, left:left + size]
        out.append(torch.from_numpy(crop.astype(np.float32) / 255.).permute(2, 0, 1))
    return torch.stack(out)


# -- physics -----------------------------------------------------------------------------------------

def make_physics(
        problem: str,
        img_size: Tuple[int, int, int],
        *,
        noise_sigma: float,
        blur_sigma: float = 1.6,
        sr_factor: int = 4,
        inpaint_fraction: float = 0.5,
        seed: int = 0,
        device: str = 'cpu',
):
    """The deepinv physics of one problem, with seeded Gaussian measurement noise.

    Args:
        problem: 'deblur', 'sr' or 'inpaint'.
        img_size: (C, H, W) of the clean images.
        noise_sigma: Measurement noise std (pixel units of [0, 1] images); 0 for none.
        blur_sigma: Std of the Gaussian blur kernel, in pixels.
        sr_factor: Downsampling factor (H and W must be multiples of it).
        inpaint_fraction: Fraction of the pixels that are missing.
        seed: Seed of the noise and of the inpainting mask.
        device: Device.

    Raises:
        ValueError: an unknown problem, or images whose size does not fit the operator.
    """
    import deepinv as dinv
    c, h, w = img_size
    if problem not in PROBLEMS:
        raise ValueError(f'unknown problem {problem!r}: expected one of {PROBLEMS}')
    if not (math.isfinite(noise_sigma) and noise_sigma >= 0):
        raise ValueError(f'noise_sigma must be finite and >= 0 (pixel units of [0, 1] images), got {noise_sigma}')
    rng = torch.Generator(device=device).manual_seed(int(seed))
    noise = dinv.physics.GaussianNoise(sigma=float(noise_sigma), rng=rng)
    if problem == 'deblur':
        if blur_sigma <= 0:
            raise ValueError(f'blur_sigma must be > 0 pixels, got {blur_sigma}')
        kernel = dinv.physics.functional.gaussian_blur(sigma=(blur_sigma, blur_sigma))
        if kernel.shape[-1] > min(h, w) or kernel.shape[-2] > min(h, w):
            raise ValueError(f'the blur kernel ({kernel.shape[-2]}x{kernel.shape[-1]}) does not fit '
                             f'{h}x{w} images: use larger images or a smaller --blur-sigma')
        return dinv.physics.BlurFFT(img_size=img_size, filter=kernel, noise_model=noise, device=device)
    if problem == 'sr':
        if sr_factor < 2 or h % sr_factor or w % sr_factor:
            raise ValueError(f'super-resolution by {sr_factor} needs image sides that are multiples of it '
                             f'(and a factor >= 2), got {h}x{w}')
        return dinv.physics.Downsampling(img_size=img_size, filter='bicubic', factor=sr_factor, padding='circular',
                                         noise_model=noise, device=device)
    if not 0 < inpaint_fraction < 1:
        raise ValueError(f'inpaint_fraction (missing pixels) must be in (0, 1), got {inpaint_fraction}')
    mask_rng = torch.Generator(device=device).manual_seed(int(seed) + 1)
    return dinv.physics.Inpainting(img_size=img_size, mask=1. - float(inpaint_fraction), pixelwise=True,
                                   noise_model=noise, device=device, rng=mask_rng)


def measurement_estimate(problem: str, physics, y: torch.Tensor, img_size: Tuple[int, int, int]) -> torch.Tensor:
    """The simplest image-space estimate from the measurement y, [B, C, H, W].

    deblur: y itself; sr: bicubic upsampling of y; inpaint: y with the missing pixels set to the mean of
    the observed ones (per image and channel). It is the "measurement" row of the tables and every
    solver's starting point.
    """
    if problem == 'deblur':
        return y.clone()
    if problem == 'sr':
        return F.interpolate(y, size=img_size[1:], mode='bicubic', align_corners=False)
    mask = physics.mask.to(y).expand_as(y)
    observed = (y * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1)
    return y * mask + observed * (1 - mask)


# -- solvers -----------------------------------------------------------------------------------------

def dpir_schedule(noise_sigma: float, iterations: int, sigma_hi: float = 49 / 255) -> Tuple[List[float], List[float]]:
    """DPIR's schedule: denoiser levels sigma_k from ``sigma_hi`` down to the noise level (geometric), and
    the data-fidelity steps gamma_k = (sigma_k / max(sigma_n, 0.01))^2 / 0.23 (pixel units).

    Returns:
        (sigma_k, gamma_k), lists of ``iterations`` floats.
    """
    if iterations < 1:
        raise ValueError(f'iterations must be >= 1, got {iterations}')
    lo = max(float(noise_sigma), 1 / 255)
    hi = max(float(sigma_hi), lo)
    sig = np.geomspace(hi, lo, iterations) if iterations > 1 else np.array([lo])
    gam = (sig / max(float(noise_sigma), 0.01)) ** 2 / DPIR_MU
    return [float(s) for s in sig], [float(g) for g in gam]


def build_solver(
        model: nn.Module,
        noise_sigma: float,
        *,
        algorithm: str = 'hqs',
        iterations: int = 8,
        sigma_hi: float = 49 / 255,
        red_stepsize: float = 1.0,
        red_lambda: float = 1.0,
):
    """A deepinv optimiser with ``model`` as its plug-and-play prior.

    Args:
        model: A timm_joint model (GradResNet, JointDensityWrapper, dncnn_deepinv, drunet_deepinv) or a
            ``DeepinvAdapter``.
        noise_sigma: Measurement noise std (pixel units).
        algorithm: 'hqs' (PnP prior, DPIR schedule) or 'red' (gradient step on the prior, then the data
            prox; an explicit potential for the joint models).
        iterations: Iterations.
        sigma_hi: hqs: the first denoiser level (pixel units).
        red_stepsize: red: gamma, the data prox's step.
        red_lambda: red: lambda, the prior's weight (gamma * lambda = 1 applies D fully).

    Returns:
        A ``deepinv.optim.BaseOptim``; call it as ``solver(y, physics, init=x0)``.
    """
    import deepinv as dinv
    adapter = model if isinstance(model, DeepinvAdapter) else DeepinvAdapter(model)
    data_fidelity = dinv.optim.data_fidelity.L2()
    if algorithm == 'hqs':
        sig, gam = dpir_schedule(noise_sigma, iterations, sigma_hi)
        return dinv.optim.optim_builder(
            iteration='HQS', prior=dinv.optim.PnP(denoiser=adapter), data_fidelity=data_fidelity,
            params_algo={'stepsize': gam, 'g_param': sig, 'lambda': 1.0}, max_iter=iterations, early_stop=False)
    if algorithm == 'red':
        prior = GradientStepPrior(adapter) if has_energy(adapter.model) else dinv.optim.RED(denoiser=adapter)
        sigma = max(float(noise_sigma), 1 / 255)
        return dinv.optim.optim_builder(
            iteration='PGD', prior=prior, data_fidelity=data_fidelity, g_first=True,
            params_algo={'stepsize': red_stepsize, 'lambda': red_lambda, 'g_param': sigma},
            max_iter=iterations, early_stop=False)
    raise ValueError(f"algorithm must be 'hqs' or 'red', got {algorithm!r}")


# -- the command -------------------------------------------------------------------------------------

def _load_priors(specs: Sequence[str], labels: Optional[Sequence[str]],
                 device: str) -> Dict[str, Tuple[nn.Module, Dict[str, Any]]]:
    if labels and len(labels) != len(specs):
        raise ValueError(f'--labels must name each of the {len(specs)} --models, got {len(labels)}')
    out: Dict[str, Tuple[nn.Module, Dict[str, Any]]] = {}
    for i, spec in enumerate(specs):
        model, info = load_model(spec, device=device)
        if not is_denoiser(model):
            raise ValueError(f'{spec!r} has no denoiser (a plain classifier): every prior must be a timm_joint '
                             f'model with denoise() (a joint model, or the dncnn_deepinv/drunet_deepinv baselines)')
        label = labels[i] if labels else str(info.get('architecture') or spec)
        if label in out:
            label = f'{label} ({i})'
        out[label] = (model.eval(), info)
    return out


def _mean(values: List[torch.Tensor]) -> float:
    return float(torch.cat(values).double().mean())


def restore(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the restoration benchmark that ``args`` describes; write results.json, results.md and the figure.

    Returns:
        The results dictionary.
    """
    from tqdm import tqdm
    from . import figures

    _check_args(args)
    check_out_dir(args.out, '--out')
    out_dir = Path(args.out)
    results_path = out_dir / 'results.json'
    if results_path.exists() and not args.overwrite:
        raise FileExistsError(f'{results_path} exists: refusing to overwrite it (pass --overwrite, or another --out)')
    t0 = time.time()
    torch.manual_seed(args.seed)
    priors = _load_priors(args.models, args.labels, args.device)
    noise_keys = [level_key(s) for s in args.noise]
    per: Dict[str, Dict[str, Dict[str, Dict[int, Dict[str, List[torch.Tensor]]]]]] = {}
    den: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    grid: Dict[str, Any] = {}
    total = len(args.problems) * len(args.sizes) * len(args.noise) * len(priors)
    with tqdm(total=total, desc='restore', disable=not args.progress, file=sys.stderr) as bar:
        for p_i, problem in enumerate(args.problems):
            for size in args.sizes:
                x = held_out_images(size, args.images).to(args.device)
                img_size = tuple(x.shape[1:])
                for n_i, (s255, key) in enumerate(zip(args.noise, noise_keys)):
                    physics = make_physics(problem, img_size, noise_sigma=s255 / 255., blur_sigma=args.blur_sigma,
                                           sr_factor=args.sr_factor, inpaint_fraction=args.inpaint_fraction,
                                           seed=args.seed + 1000 * p_i + 100 * n_i + size, device=args.device)
                    with torch.no_grad():
                        y = physics(x)
                    x0 = measurement_estimate(problem, physics, y, img_size)
                    if p_i == 0:
                        _denoising_diagnostic(priors, x, s255, key, size, args.seed, den)
                    rows = {'measurement': x0}
                    for label, (model, _) in priors.items():
                        bar.set_postfix(problem=problem, size=size, prior=label)
                        solver = build_solver(model, s255 / 255., algorithm=args.algorithm, iterations=args.iterations,
                                              sigma_hi=args.sigma_hi / 255., red_stepsize=args.red_stepsize,
                                              red_lambda=args.red_lambda)
                        rows[label] = solver(y, physics, init=x0.clone()).detach()
                        bar.update(1)
                    for label, x_hat in rows.items():
                        d = per.setdefault(problem, {}).setdefault(label, {}).setdefault(size, {})
                        d.setdefault(f'psnr_{key}', []).append(metrics.psnr(x_hat, x).cpu())
                        d.setdefault(f'ssim_{key}', []).append(metrics.ssim(x_hat.clamp(0, 1), x).cpu())
                    if size == args.sizes[-1] and n_i == 0:
                        grid[problem] = {'clean': x[:args.grid_images].cpu(),
                                         'rows': {k: v[:args.grid_images].cpu() for k, v in rows.items()}}

    labels = ['measurement'] + list(priors)
    results: Dict[str, Any] = {
        'schema_version': SCHEMA_VERSION,
        'kind': 'restoration',
        'models': {label: {'name': spec, 'checkpoint': info.get('folder') or info.get('source'),
                           'architecture': info.get('architecture'), 'num_params': info['num_params'],
                           'blind': is_blind(model), 'potential': has_energy(model)}
                   for (label, (model, info)), spec in zip(priors.items(), args.models)},
        'images': {'names': list(args.images), 'sizes': list(args.sizes), 'short_side': 256,
                   'source': 'scikit-learn sample images and scikit-image data, not in the quickstart set'},
        'problems': {p: _problem_info(p, args) for p in args.problems},
        'algorithm': _algorithm_info(args),
        'noise': noise_keys,
        'seed': args.seed,
        'units': {'sigma': '0-255', 'psnr': 'dB', 'ssim': '[0, 1]', 'blur_sigma': 'pixels'},
    }
    for metric in ('psnr', 'ssim'):
        results[metric] = {p: {label: {k: _mean([t for s in args.sizes for t in per[p][label][s][f'{metric}_{k}']])
                                       for k in noise_keys} for label in labels} for p in args.problems}
        results[f'{metric}_by_size'] = {
            p: {label: {str(s): {k: _mean(per[p][label][s][f'{metric}_{k}']) for k in noise_keys} for s in args.sizes}
                for label in labels} for p in args.problems}
    # The ceiling of each prior on these images: PSNR of its denoiser on the clean images plus noise at the
    # measurement's level (a denoiser that degrades them cannot restore beyond that).
    results['denoise_psnr'] = {label: {k: _mean(den[label][k]) if den.get(label, {}).get(k) else 'n/a'
                                       for k in noise_keys} for label in ['noisy'] + list(priors)}
    results['gain_db'] = {p: {label: {k: results['psnr'][p][label][k] - results['psnr'][p]['measurement'][k]
                                      for k in noise_keys} for label in priors} for p in args.problems}
    fig = figures.restoration_grid(grid, out_dir / 'figures' / 'restoration.png',
                                   title=f'{args.algorithm}, noise {args.noise[0]:g}/255, {args.sizes[-1]} px')
    results['figures'] = [str(fig.relative_to(out_dir))]
    results['wall_s'] = round(time.time() - t0, 2)
    results['command'] = args.command
    validate_results(results)
    atomic_write(out_dir / 'results.md', render_markdown(results), overwrite=True)
    atomic_write(results_path, json.dumps(results, indent=2, allow_nan=False) + '\n', overwrite=args.overwrite)
    return results


def _denoising_diagnostic(priors, x: torch.Tensor, s255: float, key: str, size: int, seed: int,
                          store: Dict[str, Dict[str, List[torch.Tensor]]]) -> None:
    """PSNR of each prior's denoiser on x + noise at the measurement level (sigma 0: clean x itself)."""
    g = torch.Generator().manual_seed(seed + 7 + size)
    y = x + s255 / 255. * torch.randn(x.shape, generator=g).to(x)
    if s255 > 0:  # a clean x has infinite PSNR, which JSON cannot hold
        store.setdefault('noisy', {}).setdefault(key, []).append(metrics.psnr(y, x, clamp=False).cpu())
    for label, (model, _) in priors.items():
        adapter = DeepinvAdapter(model)
        with torch.no_grad():
            d = adapter(y, max(s255, 0.5) / 255.)
        store.setdefault(label, {}).setdefault(key, []).append(metrics.psnr(d, x).cpu())


def _problem_info(problem: str, args: argparse.Namespace) -> Dict[str, Any]:
    if problem == 'deblur':
        return {'operator': 'deepinv.physics.BlurFFT (Gaussian kernel, circular)', 'blur_sigma': args.blur_sigma,
                'measurement': 'y'}
    if problem == 'sr':
        return {'operator': 'deepinv.physics.Downsampling (bicubic filter, circular)', 'factor': args.sr_factor,
                'measurement': 'bicubic upsampling of y'}
    return {'operator': 'deepinv.physics.Inpainting (pixelwise mask)', 'fraction_missing': args.inpaint_fraction,
            'measurement': 'y, missing pixels set to the mean of the observed ones'}


def _algorithm_info(args: argparse.Namespace) -> Dict[str, Any]:
    info: Dict[str, Any] = {'name': args.algorithm, 'iterations': args.iterations,
                            'init': 'the measurement row (same for every prior)'}
    if args.algorithm == 'hqs':
        info.update(prior='deepinv.optim.PnP', iteration='HQS', sigma_hi=args.sigma_hi, mu=DPIR_MU,
                    schedule='sigma_k geometric from sigma_hi to the noise level; gamma_k = (sigma_k / max(sigma_n, '
                             '0.01))^2 / mu; blind priors ignore sigma_k')
    else:
        info.update(prior='GradientStepPrior (joint models) / deepinv.optim.RED (baselines)', iteration='PGD, g_first',
                    stepsize=args.red_stepsize, **{'lambda': args.red_lambda})
    return info


def validate_results(d: Any) -> None:
    """Check a restoration results dictionary (schema_version 1); raise ValueError naming the first problem."""
    if not isinstance(d, dict) or d.get('schema_version') != SCHEMA_VERSION or d.get('kind') != 'restoration':
        raise ValueError(f'restoration results need schema_version {SCHEMA_VERSION} and kind "restoration"')
    for key in ('models', 'images', 'problems', 'algorithm', 'noise', 'psnr', 'ssim', 'gain_db', 'units'):
        if key not in d:
            raise ValueError(f'restoration results: missing required key {key!r}')
    for metric in ('psnr', 'ssim', 'gain_db'):
        for problem, per_label in d[metric].items():
            if problem not in PROBLEMS:
                raise ValueError(f'restoration results: {metric} has problem {problem!r}; expected one of {PROBLEMS}')
            for label, per_noise in per_label.items():
                for k, v in per_noise.items():
                    if level_key(float(k)) != k:
                        raise ValueError(f'restoration results: {metric}.{problem}.{label} has key {k!r}; '
                                         f'expected a 0-255 level written like "5"')
                    if not (isinstance(v, (int, float)) and math.isfinite(v)):
                        raise ValueError(
                            f'restoration results: {metric}.{problem}.{label}[{k!r}] = {v!r} is not a number')


def render_markdown(results: Dict[str, Any]) -> str:
    """Markdown tables of restoration results: PSNR / SSIM per problem (rows) and prior (columns)."""
    r = results
    labels = ['measurement'] + list(r['models'])
    alg = r['algorithm']
    lines = ['# Plug-and-play restoration', '',
             f'- algorithm: `{alg["name"]}`, {alg["iterations"]} iterations; images: '
             f'{", ".join(r["images"]["names"])} at {", ".join(str(s) for s in r["images"]["sizes"])} px; '
             f'seed {r["seed"]}',
             '- priors: ' + '; '.join(f'{k}: `{v["name"]}` ({v["num_params"]:,} parameters, '
                                       f'{"blind" if v["blind"] else "non-blind"})' for k, v in r['models'].items()),
             '']
    for k in r['noise']:
        lines += [f'## Measurement noise sigma = {k} (0-255): PSNR (dB) / SSIM', '',
                  '| problem | ' + ' | '.join(labels) + ' |', '|---|' + '---:|' * len(labels)]
        for p in r['psnr']:
            cells = [f'{r["psnr"][p][l][k]:.2f} / {r["ssim"][p][l][k]:.3f}' for l in labels]
            lines.append(f'| {p} | ' + ' | '.join(cells) + ' |')
        if 'denoise_psnr' in r:
            cells = [_fmt(r['denoise_psnr'].get('noisy' if l == 'measurement' else l, {}).get(k)) for l in labels]
            lines.append('| denoising x + noise (PSNR; the measurement column: x + noise) | '
                         + ' | '.join(cells) + ' |')
        lines.append('')
    if r.get('figures'):
        lines += ['## Figures', ''] + [f'![{Path(f).stem}]({f})' for f in r['figures']]
    return '\n'.join(lines).rstrip() + '\n'


def _fmt(v: Any) -> str:
    return f'{v:.2f}' if isinstance(v, (int, float)) and math.isfinite(v) else str(v if v is not None else '')


def _check_args(args: argparse.Namespace) -> None:
    for p in args.problems:
        if p not in PROBLEMS:
            raise ValueError(f'unknown problem {p!r}: expected some of {PROBLEMS}')
    for s in args.noise:
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f'--noise levels must be finite and >= 0 (0-255 units), got {s}')
        if 0 < s < 1:
            print(f'{program_name("timm_joint.restore")}: note: --noise {s} is in 0-255 units ({s}/255 in pixels)',
                  file=sys.stderr)
    for s in args.sizes:
        if not 8 <= s <= 256:
            raise ValueError(f'--sizes must be in [8, 256] px (the photographs are resized to a 256 px shorter '
                             f'side), got {s}')
        if 'sr' in args.problems and (args.sr_factor < 1 or s % args.sr_factor):
            raise ValueError(f'--sizes {s} is not a multiple of --sr-factor {args.sr_factor}: super-resolution '
                             f'needs sizes that the factor divides')
    if args.iterations < 1:
        raise ValueError(f'--iterations must be >= 1, got {args.iterations}')
    if args.grid_images < 1:
        raise ValueError(f'--grid-images must be >= 1, got {args.grid_images}')
    unknown = [n for n in args.images if n not in HELD_OUT_IMAGES]
    if unknown:
        raise ValueError(f'unknown --images {unknown}: expected some of {HELD_OUT_IMAGES}')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name('timm_joint.restore'),
        description='Plug-and-play restoration (deblurring, 4x super-resolution, inpainting) with deepinv, '
                    'every model given as the prior. Noise levels in 0-255 units.')
    p.add_argument('--models', nargs='+', required=True,
                   help='priors: local-dir:PATH exports (train_joint.py), hf-hub: names or registry names')
    p.add_argument('--labels', nargs='+', default=None, help='a name for each prior in the tables')
    p.add_argument('--problems', nargs='+', default=list(PROBLEMS), help=f'some of {PROBLEMS}')
    p.add_argument('--noise', type=float, nargs='+', default=[5.], help='measurement noise std (0-255)')
    p.add_argument('--sizes', type=int, nargs='+', default=[32, 64], help='image sizes (px, multiples of --sr-factor)')
    p.add_argument('--images', nargs='+', default=list(HELD_OUT_IMAGES), help=f'some of {HELD_OUT_IMAGES}')
    p.add_argument('--blur-sigma', type=float, default=1.6, help='Gaussian blur kernel std (pixels)')
    p.add_argument('--sr-factor', type=int, default=4)
    p.add_argument('--inpaint-fraction', type=float, default=0.5, help='fraction of missing pixels')
    p.add_argument('--algorithm', choices=('hqs', 'red'), default='hqs')
    p.add_argument('--iterations', type=int, default=8)
    p.add_argument('--sigma-hi', type=float, default=49., help='hqs: first denoiser level (0-255), as DPIR')
    p.add_argument('--red-stepsize', type=float, default=1.0, help='red: data step gamma')
    p.add_argument('--red-lambda', type=float, default=1.0, help='red: prior weight lambda')
    p.add_argument('--grid-images', type=int, default=3, help='images per problem in the figure')
    add_output_args(p, 'runs/restore')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), 'timm_joint.restore', argv)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` and restore; bad input raises (ValueError, TypeError, FileExistsError)."""
    return restore(parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: bad input exits with status 2 and a one-line error."""
    args = parse_args(argv)
    results = run_or_exit('timm_joint.restore', lambda: restore(args))
    print(render_markdown(results))
    print(f'wrote {Path(args.out) / "results.json"}, {Path(args.out) / "results.md"} and '
          f'{Path(args.out) / results["figures"][0]}')


if __name__ == '__main__':
    main()
