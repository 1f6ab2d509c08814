"""Evaluate a model the way the paper does: ``python -m timm_joint.evaluate`` (console: timm-joint-evaluate).

One command measures accuracy at noise levels, blind and class-conditional denoising (PSNR, SSIM),
calibration, out-of-distribution detection, adversarial robustness, certified robustness (randomized
smoothing, ``--certify``) and the Jacobian spectrum of the denoiser, and writes

    OUT/results.json    versioned results (schema_version 1, ``timm_joint.results``): the only source
                        of tables and model cards
    OUT/results.md      Markdown tables rendered from results.json alone
    OUT/figures/*.png   denoising grid, PSNR against sigma, robustness curves, certified accuracy
                        against radius, reliability diagram, Jacobian eigenvectors

Example::

    python -m timm_joint.evaluate --model gradresnet_tiny_joint --checkpoint runs/quickstart/export/best \\
        --dataset '' --data-dir data/quickstart --out runs/quickstart/eval \\
        --attack linf l2 --reference-model resnet18 --reference-checkpoint runs/resnet18/export/best \\
        --certify --certify-sigmas 12 25 50 --certify-n 10000

Noise levels on the command line are in the 0-255 convention. Every noisy image is
x + sigma * eps with eps drawn once per image from the seeded evaluation stream (``--seed``), the
same eps at every sigma, for every metric and for the attacks: results are reproducible and the
metrics of one run score the same noisy images. A model that is a plain timm classifier (no energy
head) is evaluated too; its denoising metrics are then "n/a".

Each family of results is a ``Metric`` object (``build_metrics``): one pass over the data calls every
metric's ``update`` with the same batch, then each gives its part of results.json and its figures.
Models load through ``timm_joint.io.load_model``.
"""
import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import metrics
from .cli import check_out_dir, parse_command, program_name, run_or_exit, set_cpu_threads
from .io import atomic_write, load_model, train_args_files
from .protocol import denoise_blind, has_classifier, has_energy, is_denoiser, is_joint
from .results import NA, SCHEMA_VERSION, is_number, validate_results
from .robustness import (
    ATTACKS, DEFAULT_EPSILONS, ROBUSTBENCH_EPSILONS, certify_grid, certify_modes, check_certify_args,
    check_levels, fixed_eval_noise, level_key, robust_accuracy_grid,
)

__all__ = [
    'SCHEMA_VERSION', 'load_model', 'jacobian_operator', 'jacobian_eigs', 'read_training_sigma_max',
    'read_training_cls_noise', 'Metric', 'Batch', 'build_metrics',
    'evaluate', 'validate_results', 'render_markdown', 'build_parser', 'parse_args', 'run', 'main',
]

# Keys of the denoising batch's largest noise level, in the 0-255 convention of configs and command
# lines: the export's config.json (timm_joint.sigma_max_den_255) and train_joint.py's args.yaml.
_SIGMA_MAX_KEYS = ('sigma_max_den_255', 'sigma_max_den', 'den_sigma_max')


# -- models ------------------------------------------------------------------------------------------

def _model_cfg(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return dict(cfg) if not isinstance(cfg, dict) else cfg


# -- the denoiser's Jacobian -------------------------------------------------------------------------

def jacobian_operator(energy_fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor):
    """The Jacobian J = I - H of D(y) = y - grad E(y) at one image, as a scipy ``LinearOperator``.

    H is the Hessian of E at y; J v = v - H v costs one Hessian-vector product (a double backward
    through the graph of grad E, built once and kept), and J is never materialised. J is
    symmetric because D is a gradient field.

    Args:
        energy_fn: Maps images [1, C, H, W] to energies [1].
        y: One image [1, C, H, W]; its dtype (float64 recommended) is the operator's.

    Returns:
        ``scipy.sparse.linalg.LinearOperator`` of shape (n, n), n = C * H * W.
    """
    from scipy.sparse.linalg import LinearOperator

    if y.ndim != 4 or y.shape[0] != 1:
        raise ValueError(f'expected one image [1, C, H, W], got {list(y.shape)}')
    n = y.numel()
    with torch.enable_grad():
        y_in = y.detach().clone().requires_grad_(True)
        energy = energy_fn(y_in)
        (grad_e,) = torch.autograd.grad(energy.sum(), y_in, create_graph=True)
    np_dtype = np.float64 if y.dtype == torch.float64 else np.float32

    def matvec(v: np.ndarray) -> np.ndarray:
        v_t = torch.as_tensor(np.ascontiguousarray(v).reshape(y.shape), dtype=y.dtype, device=y.device)
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(grad_e, y_in, grad_outputs=v_t, retain_graph=True)
        return (v_t - hv).detach().cpu().numpy().reshape(-1).astype(np_dtype)

    return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=np_dtype)


def jacobian_eigs(
        energy_fn: Callable[[torch.Tensor], torch.Tensor],
        y: torch.Tensor,
        *,
        k: int = 4,
        seed: int = 0,
        tol: float = 1e-5,
) -> Dict[str, torch.Tensor]:
    """Top-k and bottom-k eigenpairs of the denoiser's Jacobian at y (Lanczos, scipy's ``eigsh``).

    Args:
        energy_fn: Maps images [1, C, H, W] to energies [1].
        y: One image [1, C, H, W].
        k: Eigenpairs at each end (largest and smallest algebraic).
        seed: Seeds Lanczos' start vector, so the result is reproducible.
        tol: Relative accuracy of the eigenvalues.

    Returns:
        ``top_values`` [k] (descending), ``top_vectors`` [k, C, H, W], ``bottom_values`` [k]
        (ascending), ``bottom_vectors`` [k, C, H, W]; vectors have unit norm.
    """
    from scipy.sparse.linalg import eigsh

    n = y.numel()
    if not 1 <= k < n:
        raise ValueError(f'k must be in [1, {n - 1}] for an image of {n} values, got {k}')
    op = jacobian_operator(energy_fn, y)
    v0 = np.random.default_rng(seed).standard_normal(n).astype(op.dtype)
    out = {}
    for which, name in (('LA', 'top'), ('SA', 'bottom')):
        vals, vecs = eigsh(op, k=k, which=which, v0=v0, tol=tol)
        order = np.argsort(-vals) if name == 'top' else np.argsort(vals)
        out[f'{name}_values'] = torch.from_numpy(vals[order].copy())
        out[f'{name}_vectors'] = torch.from_numpy(vecs[:, order].T.copy()).reshape(k, *y.shape[1:])
    return out


# -- training range ----------------------------------------------------------------------------------

def _find_key(d: Any, keys: Sequence[str], depth: int = 2) -> Optional[float]:
    if not isinstance(d, dict):
        return None
    for key in keys:
        v = d.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    if depth > 0:
        for v in d.values():
            found = _find_key(v, keys, depth - 1)
            if found is not None:
                return found
    return None


def read_training_sigma_max(folder: Optional[str], override_255: Optional[float] = None) -> Dict[str, Any]:
    """The largest training noise level of the denoising batch, in the 0-255 convention.

    Looks, in order, at ``--train-sigma-max`` (``override_255``), the export's ``config.json``
    (train_joint.py writes ``timm_joint.sigma_max_den_255`` there), then the run's ``args.yaml``
    (``io.train_args_files``: train_joint.py writes ``runs/NAME/args.yaml`` and exports to
    ``runs/NAME/export/{best,last}``), for one of the keys sigma_max_den_255, sigma_max_den,
    den_sigma_max. Values are in 0-255 units, as on the training command line.

    Returns:
        {'sigma_max_255': float or None, 'source': where it came from, or why it is unknown}.
    """
    if override_255 is not None:
        return {'sigma_max_255': float(override_255), 'source': '--train-sigma-max'}
    if folder is None:
        return {'sigma_max_255': None, 'source': 'unknown: no checkpoint folder to read training arguments from'}
    base = Path(folder)
    candidates = [base / 'config.json', *train_args_files(base)]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            if path.suffix == '.json':
                data = json.loads(path.read_text())
            else:
                import yaml
                data = yaml.safe_load(path.read_text())
        except Exception:
            continue
        value = _find_key(data, _SIGMA_MAX_KEYS)
        if value is not None and value > 0:
            return {'sigma_max_255': value, 'source': str(path)}
    return {'sigma_max_255': None,
            'source': f'unknown: none of {", ".join(_SIGMA_MAX_KEYS)} in {", ".join(str(p) for p in candidates)}'}


def read_training_cls_noise(folder: Optional[str]) -> Dict[str, Any]:
    """The classification batch's training noise (0-255 units), as train_joint.py recorded it.

    Reads the export's ``config.json`` (``timm_joint.sigma_max_cls_255``, ``sigma_dist_cls``), then
    the run's ``args.yaml`` (``io.train_args_files``: ``sigma_max_cls``, ``sigma_dist_cls``).

    Returns:
        {'sigma_max_cls_255': float or None, 'sigma_dist_cls': 'squared_uniform' (sigma = max * u^2, the
        default) or 'fixed' (every image at that sigma; 0: clean), 'source': where it came from}.
    """
    if folder is not None:
        base = Path(folder)
        import yaml
        for path in (base / 'config.json', *train_args_files(base)):
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text()) if path.suffix == '.json' else yaml.safe_load(path.read_text())
            except Exception:
                continue
            if isinstance(data, dict) and isinstance(data.get('timm_joint'), dict):
                data = data['timm_joint']
            if not isinstance(data, dict):
                continue
            value = _find_key(data, ('sigma_max_cls_255', 'sigma_max_cls'), depth=0)
            if value is not None and value >= 0:
                dist = data.get('sigma_dist_cls') or 'squared_uniform'
                return {'sigma_max_cls_255': value, 'sigma_dist_cls': str(dist), 'source': str(path)}
    return {'sigma_max_cls_255': None, 'sigma_dist_cls': None, 'source': 'unknown'}


# -- datasets ----------------------------------------------------------------------------------------

def _base_dataset(ds):
    while hasattr(ds, 'dataset'):
        ds = ds.dataset
    return ds


def _label_info(ds) -> Tuple[bool, Optional[int]]:
    """(has labels, number of classes) of a timm / torchvision dataset."""
    base = _base_dataset(ds)
    c2i = getattr(getattr(base, 'reader', None), 'class_to_idx', None)
    if c2i is None:
        c2i = getattr(base, 'class_to_idx', None)
    if isinstance(c2i, dict):
        # Image-folder readers label files outside class subfolders with '' (no label).
        if not c2i or '' in c2i:
            return False, None
        return True, len(c2i)
    classes = getattr(base, 'classes', None)
    if classes:
        return True, len(classes)
    try:
        _, target = base[0][:2]
    except Exception:
        return False, None
    if target is None or (isinstance(target, (int, np.integer)) and target < 0):
        return False, None
    return True, None


def _class_names(ds) -> Optional[List[str]]:
    """The dataset's class names by label (an image folder's subfolders, torchvision's ``classes``), or None."""
    base = _base_dataset(ds)
    c2i = getattr(getattr(base, 'reader', None), 'class_to_idx', None) or getattr(base, 'class_to_idx', None)
    if isinstance(c2i, dict) and c2i and '' not in c2i:
        names = [''] * (max(c2i.values()) + 1)
        for name, i in c2i.items():
            names[i] = str(name)
        return names
    classes = getattr(base, 'classes', None)
    return [str(c) for c in classes] if classes else None


def _raw_size(ds) -> Tuple[int, int]:
    """(height, width) of the first image as stored, before the evaluation transform."""
    base = _base_dataset(ds)
    transform = getattr(base, 'transform', None)
    base.transform = None
    try:
        img = base[0][0]
    finally:
        base.transform = transform
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    w, h = img.size
    return int(h), int(w)


def _spread(total: int, n: int) -> List[int]:
    """n positions evenly spread over range(total) (all of them when n >= total)."""
    if n >= total:
        return list(range(total))
    return sorted(set(np.linspace(0, total - 1, n).round().astype(int).tolist()))


def _subset(ds, max_images: Optional[int]):
    # Evenly spread rather than the first N: image folders are sorted by class, so the first N
    # images would cover only the first classes.
    from torch.utils.data import Subset
    if max_images is None or max_images >= len(ds):
        return ds
    return Subset(ds, _spread(len(ds), max_images))


# -- the evaluation ----------------------------------------------------------------------------------

def _check_args(args: argparse.Namespace) -> None:
    from .data import is_streamed
    for flag, name in (('--dataset', args.dataset), ('--ood-dataset', args.ood_dataset)):
        if name and is_streamed(name):
            raise ValueError(
                f'{flag} {name!r} is a stream: evaluate indexes its images (--max-images spreads them over the '
                f'split, figures pick images, OOD reads sizes), so it takes an image folder, torch/... or hfds/...; '
                f'train_joint.py validates wds/ and hfids/ splits')
    check_levels(args.sigmas, '--sigmas')
    check_levels(args.psnr_sigmas, '--psnr-sigmas')
    if any(s == 0 for s in args.psnr_sigmas):
        raise ValueError('--psnr-sigmas must be > 0 (there is nothing to denoise at sigma 0)')
    check_levels(args.attack_sigmas, '--attack-sigmas')
    check_levels(args.linf_epsilons, '--linf-epsilons')
    check_levels(args.l2_epsilons, '--l2-epsilons')
    check_levels([args.eigen_sigma, args.ood_sigma], '--eigen-sigma / --ood-sigma')
    if args.eigen_sigma == 0 and args.eigen_k:
        raise ValueError('--eigen-sigma must be > 0')
    if args.train_sigma_max is not None:
        check_levels([args.train_sigma_max], '--train-sigma-max')
    for name in ('max_images', 'attack_images', 'batch_size', 'attack_steps', 'grid_images'):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {v}')
    if args.eigen_k < 0:
        raise ValueError(f'--eigen-k must be >= 0, got {args.eigen_k}')
    if args.reference_model and not (args.attack or args.certify):
        raise ValueError('--reference-model is attacked or certified beside the model: add --attack linf and/or l2, '
                         'or --certify')
    if args.certify:
        check_certify_args(args.certify_n0, args.certify_n, args.certify_alpha,
                           args.batch_size if args.certify_batch_size is None else args.certify_batch_size)
        if not args.certify_sigmas or any(not (math.isfinite(s) and s > 0) for s in args.certify_sigmas):
            raise ValueError(f'--certify-sigmas must be noise levels > 0 (0-255 units), got {args.certify_sigmas}')
        if args.certify_images < 1:
            raise ValueError(f'--certify-images must be >= 1, got {args.certify_images}')
    check_out_dir(args.out, '--out')



def _mean(values: List[torch.Tensor]) -> float:
    return float(torch.cat(values).double().mean()) if values else float('nan')


@dataclass
class _Setup:
    """What an evaluation runs on, loaded and checked before the first image is scored."""
    device: torch.device
    model: nn.Module
    info: Dict[str, Any]
    reference: Optional[nn.Module]
    ref_info: Optional[Dict[str, Any]]
    ds: Any
    ood_ds: Any
    img_size: int
    has_labels: bool
    skipped: Optional[List[Dict[str, str]]] = None  # --skip-bad-images: the files left out
    class_names: Optional[List[str]] = None


def _prepare(args: argparse.Namespace) -> _Setup:
    """Every check on the inputs (options, output folder, checkpoints, datasets), in that order."""
    from .data import create_eval_dataset, skip_bad_images

    _check_args(args)
    results_path = Path(args.out) / 'results.json'
    if results_path.exists() and not args.overwrite:
        raise FileExistsError(f'{results_path} exists: refusing to overwrite it (pass --overwrite, or another --out)')
    device = torch.device(args.device)
    model, info = load_model(args.model, args.checkpoint, num_classes=args.num_classes, device=device)
    reference = ref_info = None
    if args.reference_model:
        reference, ref_info = load_model(
            args.reference_model, args.reference_checkpoint, num_classes=args.num_classes, device=device)
    # A joint model classifies and denoises (blind and class-conditional); a dedicated denoiser (DnCNN,
    # DRUNet) only denoises, and a non-blind one is told sigma; a plain timm classifier only classifies.
    if not has_classifier(model) and (args.sigmas or args.attack or args.certify):
        raise ValueError(f'{args.model} has no classifier: pass --sigmas with no values, no --attack and no --certify')
    if args.certify and args.certify_mode == 'denoised' and _certify_mode_list(args)[0] not in certify_modes(model):
        raise ValueError(f'--certify-mode denoised needs a model that classifies and denoises; {args.model} only '
                         f'classifies: use --certify-mode own')
    cfg = _model_cfg(model)
    img_size = args.img_size or int(cfg.get('input_size', (3, 224, 224))[-1])
    crop_pct = float(cfg.get('crop_pct', 1.0) or 1.0) if args.crop_pct is None else args.crop_pct

    ds = create_eval_dataset(args.dataset, args.data_dir, img_size=img_size, split=args.split,
                             download=args.dataset_download, crop_pct=crop_pct)
    skipped = None
    if args.skip_bad_images:
        checked, bad = skip_bad_images(ds, workers=args.workers)
        skipped = [{'path': path, 'error': why} for path, why in bad]
        if bad:
            print(f'--skip-bad-images: left out {len(bad)} of {checked} images that cannot be read, e.g. {bad[0][0]} '
                  f'({bad[0][1]}); results.json lists them', file=sys.stderr)
    has_labels, n_dataset_classes = _label_info(ds)
    if (args.sigmas or args.attack or args.certify) and not has_labels:
        raise ValueError(
            f'dataset {args.dataset!r} at {args.data_dir!r} (split {args.split!r}) has no class labels '
            f'(images are not in class subfolders), but accuracy is asked: pass --sigmas with no values, '
            f'no --attack and no --certify to evaluate denoising only')
    num_classes = getattr(model, 'num_classes', 0)
    if has_labels and n_dataset_classes and num_classes and n_dataset_classes > num_classes:
        raise ValueError(
            f'the dataset has {n_dataset_classes} classes but the model predicts {num_classes}: '
            f'check --model/--checkpoint against --dataset')
    ood_ds = None
    if args.ood_data_dir or args.ood_dataset:
        ood_ds = create_eval_dataset(args.ood_dataset or '', args.ood_data_dir, img_size=img_size,
                                     split=args.ood_split, download=args.dataset_download, crop_pct=crop_pct)
        if args.skip_bad_images:
            _, bad = skip_bad_images(ood_ds, workers=args.workers)
            skipped += [{'path': path, 'error': why} for path, why in bad]
        size = _raw_size(ood_ds)
        if size != (img_size, img_size) and not args.ood_resize:
            raise ValueError(
                f'the OOD dataset has {size[0]}x{size[1]} images but the model evaluates at '
                f'{img_size}x{img_size}: resizing would itself mark them out of distribution. Give an OOD '
                f'dataset at {img_size}x{img_size}, or pass --ood-resize to accept it')
        ood_ds = _subset(ood_ds, args.max_images)
    return _Setup(device=device, model=model, info=info, reference=reference, ref_info=ref_info,
                  ds=_subset(ds, args.max_images), ood_ds=ood_ds, img_size=img_size, has_labels=has_labels,
                  skipped=skipped, class_names=_class_names(ds))


class Batch:
    """One batch of the evaluation pass, shared by the metrics: clean images x [B, C, H, W], labels
    [B], dataset indices [B], the fixed noise eps [B, C, H, W] and the batch's positions in the
    evaluated split; the noisy images and the model's logits at a noise level are computed once."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                 eps: torch.Tensor, positions: Sequence[int]):
        self.model, self.x, self.target, self.index, self.eps = model, x, target, index, eps
        self.positions = list(positions)
        self._noisy: Dict[float, torch.Tensor] = {}
        self._logits: Dict[float, torch.Tensor] = {}

    def noisy(self, sigma_255: float) -> torch.Tensor:
        """y = x + sigma * eps, sigma in 0-255 units."""
        if sigma_255 not in self._noisy:
            self._noisy[sigma_255] = self.x + (sigma_255 / 255.) * self.eps
        return self._noisy[sigma_255]

    def logits(self, sigma_255: float) -> torch.Tensor:
        """The model's logits of y [B, num_classes], in float32."""
        if sigma_255 not in self._logits:
            self._logits[sigma_255] = self.model(self.noisy(sigma_255)).float()
        return self._logits[sigma_255]

    def select(self, positions: Set[int]) -> torch.Tensor:
        """Which images of the batch stand at ``positions`` of the split, a bool mask [B] on the CPU."""
        return torch.tensor([p in positions for p in self.positions])


class Metric:
    """One family of results: ``update`` with every batch of the evaluation pass (under
    ``torch.no_grad()``), then ``result`` (keys of results.json, in the order they are written) and
    ``figures`` once at the end. Metrics that need no pass over the data do their work in ``result``."""

    # Figures are drawn in this order, the order results.json has always listed them in.
    figure_order = 0

    def update(self, batch: Batch) -> None:
        pass

    def result(self) -> Dict[str, Any]:
        return {}

    def figures(self, results: Dict[str, Any], fig_dir: Path) -> List[Path]:
        return []


class NoisyAccuracy(Metric):
    """Top-1 accuracy (%) at each noise level of ``sigmas_255``: ``accuracy``."""

    def __init__(self, sigmas_255: Sequence[float]):
        self.levels = sorted(set(sigmas_255))
        self.keys = [level_key(s) for s in sigmas_255]
        self.correct: Dict[str, List[torch.Tensor]] = {k: [] for k in self.keys}

    def update(self, batch: Batch) -> None:
        for s255 in self.levels:
            self.correct[level_key(s255)].append(metrics.top1_correct(batch.logits(s255), batch.target).cpu())

    def result(self) -> Dict[str, Any]:
        return {'accuracy': {k: 100. * float(torch.cat(self.correct[k]).double().mean()) for k in self.keys}}


class Calibration(NoisyAccuracy):
    """Expected calibration error (%) and reliability bins of the max softmax at each noise level:
    ``ece``, ``reliability``; the reliability diagram at sigma 0 (or the first level)."""

    figure_order = 3

    def __init__(self, sigmas_255: Sequence[float]):
        super().__init__(sigmas_255)
        self.confidence: Dict[str, List[torch.Tensor]] = {k: [] for k in self.keys}

    def update(self, batch: Batch) -> None:
        super().update(batch)
        for s255 in self.levels:
            self.confidence[level_key(s255)].append(batch.logits(s255).softmax(-1).max(-1).values.cpu())

    def result(self) -> Dict[str, Any]:
        ece, reliability = {}, {}
        for k in self.keys:
            value, bins = metrics.ece(torch.cat(self.confidence[k]), torch.cat(self.correct[k]))
            ece[k] = 100. * value
            # JSON has no NaN: empty bins get null.
            reliability[k] = {name: [None if isinstance(v, float) and not math.isfinite(v) else v for v in vals]
                              for name, vals in bins.items()}
        return {'ece': ece, 'reliability': reliability}

    def figures(self, results: Dict[str, Any], fig_dir: Path) -> List[Path]:
        from . import figures
        if not self.keys:
            return []
        k = '0' if '0' in self.keys else self.keys[0]
        return [figures.reliability_diagram(
            results['reliability'][k], fig_dir / 'reliability.png',
            title=f'sigma={k}: top-1 {results["accuracy"][k]:.1f}%, ECE {results["ece"][k]:.2f}%')]


class Denoising(Metric):
    """PSNR and SSIM at each noise level of ``sigmas_255`` (> 0): of the noisy images, of the blind D(y)
    and, for a joint model, of D(y, c) with the true class (when the data has labels) and with the
    predicted one: ``noisy_psnr``, ``psnr``, ``ssim``, ``cond_gain_db`` ("n/a" where a denoiser cannot
    say), and ``training`` (its training noise range). Figures: a denoising grid at sigma 25 (or the
    middle level) and PSNR against sigma."""

    VARIANTS = ('blind', 'cond_true', 'cond_pred')

    def __init__(self, model: nn.Module, sigmas_255: Sequence[float], *, has_labels: bool,
                 grid_positions: Set[int], training: Dict[str, Any], class_names: Optional[Sequence[str]] = None,
                 label: Optional[str] = None):
        self.denoises, self.conditional, self.has_labels = is_denoiser(model), is_joint(model), has_labels
        self.class_names, self.label = class_names, label
        self.levels = sorted(set(sigmas_255))
        self.keys = [level_key(s) for s in sigmas_255]
        self.per: Dict[str, Dict[str, List[torch.Tensor]]] = {
            name: {k: [] for k in self.keys}
            for name in ('noisy',) + self.VARIANTS + tuple(f'ssim_{v}' for v in self.VARIANTS)}
        self.grid_sigma = 25. if 25. in sigmas_255 else (
            sorted(sigmas_255)[len(sigmas_255) // 2] if sigmas_255 else None)
        self.grid_positions = grid_positions
        self.grid: Dict[str, List[torch.Tensor]] = {name: [] for name in ('clean', 'noisy', 'blind', 'cond', 'labels')}
        self.training = training

    def update(self, batch: Batch) -> None:
        x, target, model = batch.x, batch.target, batch.model
        in_grid = batch.select(self.grid_positions).to(x.device)
        for s255 in self.levels:
            key, sigma, y = level_key(s255), s255 / 255., batch.noisy(s255)
            self.per['noisy'][key].append(metrics.psnr(y, x, clamp=False).cpu())
            if not self.denoises:
                continue
            denoised = {'blind': denoise_blind(model, y, sigma)}
            labels = target
            if self.conditional:
                pred = batch.logits(s255).argmax(-1)
                denoised['cond_pred'] = model.denoise(y, sigma=sigma, c=pred)
                if self.has_labels:
                    denoised['cond_true'] = model.denoise(y, sigma=sigma, c=target)
                else:
                    labels = pred
            for name, d in denoised.items():
                self.per[name][key].append(metrics.psnr(d, x).cpu())
                self.per[f'ssim_{name}'][key].append(metrics.ssim(d, x).cpu())
            if s255 == self.grid_sigma and bool(in_grid.any()):
                cond = denoised.get('cond_true', denoised.get('cond_pred', denoised['blind']))
                for name, t in (('clean', x), ('noisy', y), ('blind', denoised['blind']), ('cond', cond),
                                ('labels', labels)):
                    self.grid[name].append(t[in_grid].cpu())

    def _class_title(self, c: int) -> str:
        """A grid row's class, by its name when the dataset has one (the predicted one without labels)."""
        name = self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else f'class {c}'
        return name if self.has_labels else f'predicted: {name}'

    def _stat(self, name: str, key: str) -> Any:
        values = self.per[name][key]
        return _mean(values) if values else NA

    def result(self) -> Dict[str, Any]:
        psnr = {v: {k: self._stat(v, k) for k in self.keys} for v in self.VARIANTS}

        def gain(variant: str, k: str) -> Any:
            a, b = psnr[variant][k], psnr['blind'][k]
            return a - b if isinstance(a, float) and isinstance(b, float) else NA

        return {
            'noisy_psnr': {k: self._stat('noisy', k) for k in self.keys},
            'psnr': psnr,
            'ssim': {v: {k: self._stat(f'ssim_{v}', k) for k in self.keys} for v in self.VARIANTS},
            'cond_gain_db': {'true': {k: gain('cond_true', k) for k in self.keys},
                             'pred': {k: gain('cond_pred', k) for k in self.keys}},
            'training': self.training,
        }

    def figures(self, results: Dict[str, Any], fig_dir: Path) -> List[Path]:
        from . import figures
        written = []
        if self.grid['clean']:
            grid = {name: torch.cat(rows) for name, rows in self.grid.items()}
            written.append(figures.denoising_grid(
                grid['clean'], grid['noisy'], grid['blind'], grid['cond'], fig_dir / 'denoising_grid.png',
                sigma_255=self.grid_sigma, titles=[self._class_title(int(c)) for c in grid['labels']]))
        if self.denoises and self.keys:
            written.append(figures.psnr_vs_sigma(results, fig_dir / 'psnr_vs_sigma.png',
                                                 train_sigma_max_255=self.training['sigma_max_255'],
                                                 title=self.label))
        return written


class OODDetection(Metric):
    """AUROC of telling the evaluated images (in) from another dataset's (out) at one noise level, by
    -E(y) (a joint model: it ranks images as log p_sigma(y) does, at any sigma) and by the max softmax
    (the baseline): ``ood``."""

    SCORES = ('neg_energy', 'max_softmax')

    def __init__(self, model: nn.Module, ood_ds: Any, args: argparse.Namespace, device: torch.device):
        self.model, self.ood_ds, self.args, self.device = model, ood_ds, args, device
        self.sigma = args.ood_sigma / 255.
        self.scores: Dict[str, Dict[str, List[torch.Tensor]]] = {
            side: {name: [] for name in self.SCORES} for side in ('in', 'out')}

    def update(self, batch: Batch) -> None:
        self._score(batch.x, batch.eps, self.scores['in'])

    def _score(self, x: torch.Tensor, eps: torch.Tensor, store: Dict[str, List[torch.Tensor]]) -> None:
        y = x + self.sigma * eps if self.sigma > 0 else x
        if has_energy(self.model):
            logits, energy = self.model.forward_joint(y)
            store['neg_energy'].append(-energy.double().cpu())
        else:
            logits = self.model(y)
        store['max_softmax'].append(logits.float().softmax(-1).max(-1).values.double().cpu())

    def result(self) -> Dict[str, Any]:
        from torch.utils.data import DataLoader
        from tqdm import tqdm
        args = self.args
        loader = DataLoader(self.ood_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
        with torch.no_grad():
            for x, _, index in tqdm(loader, desc='ood', disable=not args.progress, file=sys.stderr):
                x = x.to(self.device)
                # A different seed offset keeps the OOD noise independent of the in-distribution noise.
                eps = fixed_eval_noise(index.tolist(), x.shape[1:], seed=args.seed + 1).to(device=self.device,
                                                                                          dtype=x.dtype)
                self._score(x, eps, self.scores['out'])
        auroc = {}
        for name in self.SCORES:
            s_in, s_out = self.scores['in'][name], self.scores['out'][name]
            auroc[name] = metrics.auroc(torch.cat(s_in), torch.cat(s_out)) if s_in and s_out else NA
        return {'ood': {
            'dataset': args.ood_dataset or '', 'data_dir': args.ood_data_dir, 'split': args.ood_split,
            'num_images': sum(t.numel() for t in self.scores['out']['max_softmax']),
            'sigma': level_key(args.ood_sigma), 'auroc': auroc,
        }}


class Attacks(Metric):
    """Robust top-1 (%) under PGD (foolbox) over (epsilon, test-time sigma) grids, for the model and the
    reference on the same images and noise: ``robustness``, and its curves."""

    figure_order = 1

    def __init__(self, models: Dict[str, nn.Module], positions: Set[int], args: argparse.Namespace,
                 ref_info: Optional[Dict[str, Any]], labels: Optional[Dict[str, str]] = None):
        self.models, self.positions, self.args, self.ref_info = models, positions, args, ref_info
        self.labels = labels or {}
        self.pool: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, batch: Batch) -> None:
        take = batch.select(self.positions)
        if bool(take.any()):
            on_device = take.to(batch.x.device)
            self.pool.append((batch.x[on_device], batch.target[on_device], batch.index[take]))

    def result(self) -> Dict[str, Any]:
        from tqdm import tqdm
        args = self.args
        images = torch.cat([a[0] for a in self.pool])
        labels = torch.cat([a[1] for a in self.pool])
        indices = torch.cat([a[2] for a in self.pool]).tolist()
        eps_grid = {'linf': [e / 255. for e in args.linf_epsilons], 'l2': list(args.l2_epsilons)}
        total = len(self.models) * len(args.attack_sigmas) * len(args.attack) * images.shape[0]
        acc = {}
        with tqdm(total=total, desc='attack', disable=not args.progress, file=sys.stderr) as bar:
            for name, m in self.models.items():
                acc[name] = robust_accuracy_grid(
                    m, images, labels, indices, attacks=args.attack, epsilons=eps_grid,
                    sigmas=[s / 255. for s in args.attack_sigmas], steps=args.attack_steps,
                    seed=args.seed, batch_size=args.batch_size, progress=bar.update)
        return {'robustness': {
            'num_images': int(images.shape[0]), 'steps': args.attack_steps,
            'sigmas': [level_key(s) for s in args.attack_sigmas],
            'epsilon_units': {'linf': '1/255', 'l2': 'L2 norm, [0, 1] pixels'},
            'robustbench': {'linf': '8', 'l2': '0.5'},
            'reference': {'name': args.reference_model, 'checkpoint': args.reference_checkpoint,
                          'num_params': self.ref_info['num_params'],
                          'label': list(self.labels.values())[-1] if len(self.labels) > 1 else None}
            if self.ref_info else None,
            'accuracy': acc,
        }}

    def figures(self, results: Dict[str, Any], fig_dir: Path) -> List[Path]:
        from . import figures
        return [figures.robustness_curves(results['robustness'], fig_dir / 'robustness.png', labels=self.labels)]


class Certification(Metric):
    """Certified L2 robustness by randomized smoothing (``robustness.certify_grid``), the model and the
    reference on the same images and noise, with where each classifier was trained: ``certify``, and
    the certified accuracy against radius."""

    figure_order = 2

    def __init__(self, models: Dict[str, nn.Module], folders: Dict[str, Optional[str]], ds: Any,
                 args: argparse.Namespace, device: torch.device, labels: Optional[Dict[str, str]] = None):
        self.models, self.folders, self.ds, self.args, self.device = models, folders, ds, args, device
        self.labels = labels or {}

    def result(self) -> Dict[str, Any]:
        args = self.args
        items = [self.ds[p] for p in _spread(len(self.ds), args.certify_images)]
        certify = certify_grid(
            self.models, torch.stack([it[0] for it in items]).to(self.device),
            torch.tensor([int(it[1]) for it in items]), [int(it[2]) for it in items],
            sigmas=[s / 255. for s in args.certify_sigmas], modes=_certify_mode_list(args),
            n0=args.certify_n0, n=args.certify_n, alpha=args.certify_alpha,
            batch_size=args.batch_size if args.certify_batch_size is None else args.certify_batch_size,
            seed=args.seed, progress=args.progress,
            log=lambda line: print(line, file=sys.stderr, flush=True))
        # Where each classifier was trained: a sigma outside its classification noise is extrapolation.
        training_cls = {name: read_training_cls_noise(folder) for name, folder in self.folders.items()}
        certify['training'] = training_cls
        certify['outside_training'] = {
            name: _outside_cls_range(certify['sigmas'], t) for name, t in training_cls.items()}
        return {'certify': certify}

    def figures(self, results: Dict[str, Any], fig_dir: Path) -> List[Path]:
        from . import figures
        return [figures.certified_accuracy_curves(results['certify'], fig_dir / 'certified_accuracy.png',
                                                  labels=self.labels)]


class JacobianSpectrum(Metric):
    """Top and bottom eigenpairs of the denoiser's Jacobian at the first image of the split, noisy at
    ``--eigen-sigma``, in float64 (``jacobian_eigs``): ``eigen``, and the eigenvectors."""

    figure_order = 4

    def __init__(self, model: nn.Module, ds: Any, args: argparse.Namespace, device: torch.device):
        self.model, self.ds, self.args, self.device = model, ds, args, device
        self.y0: Optional[torch.Tensor] = None
        self.eigen: Optional[Dict[str, torch.Tensor]] = None

    def result(self) -> Dict[str, Any]:
        args = self.args
        x0, _, i0 = self.ds[0]
        eps0 = fixed_eval_noise([i0], x0.shape, seed=args.seed)
        self.y0 = (x0[None] + args.eigen_sigma / 255. * eps0).to(device=self.device, dtype=torch.float64)
        model64 = copy.deepcopy(self.model).double()
        self.eigen = jacobian_eigs(model64.energy, self.y0, k=min(args.eigen_k, self.y0.numel() - 1), seed=args.seed)
        del model64
        return {'eigen': {
            'image_index': int(i0), 'sigma': level_key(args.eigen_sigma), 'k': int(self.eigen['top_values'].numel()),
            'top': [float(v) for v in self.eigen['top_values']],
            'bottom': [float(v) for v in self.eigen['bottom_values']],
        }}

    def figures(self, results: Dict[str, Any], fig_dir: Path) -> List[Path]:
        from . import figures
        e = self.eigen
        return [figures.eigenvector_figure(
            self.y0[0].float(), e['top_values'].tolist(), e['top_vectors'], e['bottom_values'].tolist(),
            e['bottom_vectors'], fig_dir / 'jacobian_eigenvectors.png', sigma_255=self.args.eigen_sigma)]


def model_label(info: Dict[str, Any], override: Optional[str] = None) -> str:
    """A short name for a model in figures: ``override`` (``--label``), else its architecture and, for
    an export of train_joint.py, the task it was trained for, e.g. 'resnet18 (classification)'.

    Args:
        info: What ``load_model`` says about the model (``architecture``, ``config``, ``name``).
        override: A label given on the command line.
    """
    if override:
        return override
    arch = str(info.get('architecture') or info.get('name') or 'model')
    if arch.startswith(('local-dir:', 'hf-hub:')) or '/' in arch:
        arch = Path(arch.split(':', 1)[-1].rstrip('/')).name or arch
    config = info.get('config') or {}
    task = (config.get('timm_joint') or {}).get('task') if isinstance(config, dict) else None
    return f'{arch} ({task})' if task else arch


def _model_names(args: argparse.Namespace, setup: _Setup) -> Dict[str, str]:
    """{name in results.json: label in figures} of the model and the reference (``--label``,
    ``--reference-label``; the reference's label gets ' (reference)' when the two would read alike)."""
    names = {args.model: model_label(setup.info, args.label)}
    if setup.reference is not None:
        ref_name = args.reference_model if args.reference_model != args.model else f'{args.reference_model} (reference)'
        ref_label = model_label(setup.ref_info, args.reference_label)
        if ref_label == names[args.model]:
            ref_label += ' (reference)'
        names[ref_name] = ref_label
    return names


def build_metrics(args: argparse.Namespace, setup: _Setup) -> List[Metric]:
    """The metrics ``args`` asks for, in the order their results are written."""
    ds, model = setup.ds, setup.model
    labels = _model_names(args, setup)
    models, folders = {args.model: model}, {args.model: setup.info.get('folder')}
    if setup.reference is not None:
        ref_name = list(labels)[1]
        models[ref_name], folders[ref_name] = setup.reference, setup.ref_info.get('folder')
    out: List[Metric] = [
        NoisyAccuracy(args.sigmas), Calibration(args.sigmas),
        Denoising(model, args.psnr_sigmas, has_labels=setup.has_labels,
                  grid_positions=set(_spread(len(ds), args.grid_images)),
                  training=read_training_sigma_max(setup.info.get('folder'), args.train_sigma_max),
                  class_names=setup.class_names, label=labels[args.model]),
    ]
    if setup.ood_ds is not None:
        out.append(OODDetection(model, setup.ood_ds, args, setup.device))
    if args.attack:
        out.append(Attacks(models, set(_spread(len(ds), args.attack_images)), args, setup.ref_info, labels=labels))
    if args.certify:
        out.append(Certification(models, folders, ds, args, setup.device, labels=labels))
    if has_energy(model) and args.eigen_k > 0:
        out.append(JacobianSpectrum(model, ds, args, setup.device))
    return out


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the evaluation that ``args`` describes and write OUT/results.json, results.md and figures.

    Every check on the inputs (options, output folder, checkpoints, datasets) happens before the
    first image is scored. One pass over the data updates every metric (``build_metrics``) with the
    same noisy images; each then gives its results and figures.

    Returns:
        The results dictionary (as written).
    """
    from tqdm import tqdm
    from torch.utils.data import DataLoader

    setup = _prepare(args)
    device, out_dir = setup.device, Path(args.out)
    if device.type == 'cpu':
        threads, why = set_cpu_threads(args.threads)
        print(f'CPU threads: {threads} ({why})', file=sys.stderr)
    metric_list = build_metrics(args, setup)
    torch.manual_seed(args.seed)
    t0 = time.time()
    loader = DataLoader(setup.ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    n_images = 0
    with torch.no_grad():
        for x, target, index in tqdm(loader, desc='evaluate', disable=not args.progress, file=sys.stderr):
            x, target = x.to(device), target.to(device)
            eps = fixed_eval_noise(index.tolist(), x.shape[1:], seed=args.seed).to(device=device, dtype=x.dtype)
            batch = Batch(setup.model, x, target, index, eps, range(n_images, n_images + x.shape[0]))
            n_images += x.shape[0]
            for metric in metric_list:
                metric.update(batch)

    info = setup.info
    results: Dict[str, Any] = {
        'schema_version': SCHEMA_VERSION,
        'model': {'name': args.model, 'label': _model_names(args, setup)[args.model],
                  'checkpoint': args.checkpoint or info.get('folder') or info.get('source'),
                  'num_params': info['num_params'],
                  'architecture': info.get('architecture'), 'denoiser': is_denoiser(setup.model)},
        'dataset': {'name': args.dataset, 'split': args.split, 'num_images': n_images, 'img_size': setup.img_size,
                    'labels': setup.has_labels,
                    **({'skipped_images': setup.skipped} if setup.skipped is not None else {})},
        'seed': args.seed,
        'units': {'sigma': '0-255', 'accuracy': '% top-1', 'ece': '%', 'psnr': 'dB', 'ssim': '[0, 1]',
                  'auroc': '[0, 1]'},
    }
    for metric in metric_list:
        results.update(metric.result())
    results['eval_time_s'] = round(time.time() - t0, 2)

    # Figures, then the results (written last, atomically).
    fig_dir = out_dir / 'figures'
    written = [p for metric in sorted(metric_list, key=lambda m: m.figure_order)
               for p in metric.figures(results, fig_dir)]
    results['figures'] = [str(Path(p).relative_to(out_dir)) for p in written]
    results['command'] = args.command
    validate_results(results)
    atomic_write(out_dir / 'results.md', render_markdown(results))
    atomic_write(out_dir / 'results.json', json.dumps(results, indent=2, allow_nan=False) + '\n',
                 overwrite=args.overwrite)
    return results


def _certify_mode_list(args: argparse.Namespace) -> List[str]:
    """--certify-mode and --certify-denoiser as base-classifier names (``robustness.CERTIFY_MODES``)."""
    denoised = 'denoised' if args.certify_denoiser == 'blind' else 'denoised_cond'
    return {'own': ['own'], 'denoised': [denoised], 'both': ['own', denoised]}[args.certify_mode]


def _outside_cls_range(sigma_keys: Sequence[str], cls_noise: Dict[str, Any]) -> List[str]:
    """The certification sigmas the classifier never saw in training: above sigma_max_cls, or any other than
    the fixed training sigma. Empty when the training noise is unknown."""
    top = cls_noise.get('sigma_max_cls_255')
    if top is None:
        return []
    if cls_noise.get('sigma_dist_cls') == 'fixed':
        return [k for k in sigma_keys if abs(float(k) - top) > 1e-6]
    return [k for k in sigma_keys if float(k) > top + 1e-6]


# -- results: Markdown -------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 2) -> str:
    return f'{v:.{digits}f}' if is_number(v) else (str(v) if v is not None else '')


def render_markdown(results: Dict[str, Any]) -> str:
    """Markdown tables of a results dictionary (and nothing else: the JSON is the only source)."""
    r = results
    m, ds = r['model'], r['dataset']
    lines = [f'# Evaluation of `{m["name"]}`', '',
             f'- checkpoint: `{m.get("checkpoint")}`; parameters: {m["num_params"]:,}',
             f'- data: `{ds["name"] or "image folder"}` split `{ds["split"]}`, {ds["num_images"]} images at '
             f'{ds["img_size"]} px; noise seed {r.get("seed", "")}; noise levels in 0-255 units', '']
    skipped = ds.get('skipped_images')
    if skipped:
        lines[-1:-1] = [f'- left out {len(skipped)} image{"s" if len(skipped) > 1 else ""} that cannot be read '
                        f'(--skip-bad-images): '
                        + ', '.join(f'`{s["path"]}`' for s in skipped[:5]) + (' ...' if len(skipped) > 5 else '')]
    training = r.get('training') or {}
    if training.get('sigma_max_255') is not None:
        lines += [f'- training noise range: sigma <= {training["sigma_max_255"]:g} (from {training.get("source")})', '']
    keys = sorted(set(r['accuracy']) | set(r['noisy_psnr']), key=float)
    lines += ['| sigma | top-1 (%) | ECE (%) | noisy PSNR | PSNR D(y) | PSNR D(y,c) true | PSNR D(y,c) pred '
              '| gain true (dB) | gain pred (dB) | SSIM D(y) | SSIM D(y,c) true |',
              '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for k in keys:
        def g(d: Dict[str, Any], digits: int = 2) -> str:
            return _fmt(d.get(k, ''), digits)
        lines.append(
            f'| {k} | {g(r["accuracy"])} | {g(r["ece"])} | {g(r["noisy_psnr"])} | {g(r["psnr"]["blind"])} '
            f'| {g(r["psnr"]["cond_true"])} | {g(r["psnr"]["cond_pred"])} | {g(r["cond_gain_db"]["true"], 3)} '
            f'| {g(r["cond_gain_db"]["pred"], 3)} | {g(r["ssim"]["blind"], 4)} | {g(r["ssim"]["cond_true"], 4)} |')
    if 'ood' in r:
        o = r['ood']
        lines += ['', f'## Out-of-distribution detection: `{o.get("dataset") or o.get("data_dir")}` '
                      f'({o.get("num_images")} images, sigma {o.get("sigma")})', '',
                  '| score | AUROC |', '|---|---:|']
        names = {'neg_energy': '-E(y) (log p(y))', 'max_softmax': 'max softmax (baseline)'}
        for k, v in o['auroc'].items():
            lines.append(f'| {names.get(k, k)} | {_fmt(v, 4)} |')
    if 'robustness' in r:
        rb = r['robustness']
        lines += ['', f'## Robust top-1 (%), PGD {rb.get("steps")} steps, {rb.get("num_images")} images', '']
        attacks = sorted({a for grid in rb['accuracy'].values() for a in grid})
        for a in attacks:
            eps_keys = sorted({e for grid in rb['accuracy'].values() for cells in grid.get(a, {}).values()
                               for e in cells}, key=float)
            unit = rb.get('epsilon_units', {}).get(a, '')
            lines += [f'{a.upper()} (epsilon in {unit}):', '',
                      '| model | sigma | ' + ' | '.join(f'eps {e}' for e in eps_keys) + ' |',
                      '|---|---:|' + '---:|' * len(eps_keys)]
            for name, grid in rb['accuracy'].items():
                for sigma, cells in sorted(grid.get(a, {}).items(), key=lambda kv: float(kv[0])):
                    lines.append(f'| {name} | {sigma} | ' + ' | '.join(_fmt(cells.get(e, '')) for e in eps_keys) + ' |')
            lines.append('')
    if 'certify' in r:
        lines += [''] + _render_certify(r['certify'])
    if 'eigen' in r:
        e = r['eigen']
        lines += ['', f"## Eigenvalues of the denoiser's Jacobian (image {e.get('image_index')}, sigma {e.get('sigma')})", '',
                  '- top: ' + ', '.join(f'{v:.4f}' for v in e['top']),
                  '- bottom: ' + ', '.join(f'{v:.4f}' for v in e['bottom'])]
    if r.get('figures'):
        lines += ['', '## Figures', ''] + [f'![{Path(p).stem}]({p})' for p in r['figures']]
    return '\n'.join(lines).rstrip() + '\n'


_MODE_NAMES = {'own': 'own (noisy logits)', 'denoised': 'denoised D(y)', 'denoised_cond': 'denoised D(y, c)'}


def _render_certify(c: Dict[str, Any]) -> List[str]:
    """The certified-accuracy table of ``results['certify']``, with its settings and caveats."""
    radii = c['radii']
    lines = [f'## Certified top-1 (%), randomized smoothing, {c["num_images"]} images', '',
             f'- n0 = {c["n0"]}, n = {c["n"]:,}, alpha = {c["alpha"]:g}, noise seed {c.get("seed", "")}; radius r: '
             f'L2 norm over all pixels of a [0, 1] image; sigma in 0-255 units',
             '- max radius: the largest radius n and alpha can certify at that sigma (all samples agreeing); '
             'beyond it (—) the certified accuracy is 0 by construction, not a measurement']
    outside = c.get('outside_training') or {}
    for name, training in (c.get('training') or {}).items():
        if training.get('sigma_max_cls_255') is None:
            lines.append(f'- {name}: classification training noise unknown')
            continue
        dist, top = training.get('sigma_dist_cls'), training['sigma_max_cls_255']
        seen = (f'sigma = {top:g} for every image' if dist == 'fixed'
                else f'sigma = {top:g} * u^2, u ~ U(0, 1)' if dist in (None, 'squared_uniform') else f'{dist}, max {top:g}')
        out = outside.get(name) or []
        lines.append(f'- {name}: classification training noise {seen}; '
                     + (f'sigma {", ".join(out)} outside it (marked *)' if out else 'every sigma inside it'))
    lines += ['', '| model | base classifier | sigma | ' + ' | '.join(f'r={k}' for k in radii)
              + ' | abstain (%) | max radius | time (s) |', '|---|---|---:|' + '---:|' * (len(radii) + 3)]
    for name, per_mode in c['models'].items():
        for mode, per_sigma in per_mode.items():
            for sigma in c['sigmas']:
                cell = per_sigma[sigma]
                mark = '*' if sigma in (outside.get(name) or []) else ''
                reach = c['max_radius'][sigma]
                lines.append(f'| {name} | {_MODE_NAMES.get(mode, mode)} | {sigma}{mark} | '
                             + ' | '.join(_fmt(cell['accuracy'][k], 1) if float(k) <= reach else '—' for k in radii)
                             + f' | {_fmt(cell["abstain"], 1)} | {_fmt(c["max_radius"][sigma], 3)} | {_fmt(cell.get("time_s"), 1)} |')
    for name, modes in (c.get('skipped') or {}).items():
        lines += ['', f'{name}: no {", ".join(modes)} base classifier (it has no denoiser)']
    return lines


# -- command line ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name('timm_joint.evaluate'),
        description='Evaluate a classification-denoising model (or any timm classifier): accuracy at noise '
                    'levels, PSNR/SSIM of blind and class-conditional denoising, calibration, OOD detection, '
                    'adversarial robustness, Jacobian eigenvectors. Noise levels in 0-255 units.')
    p.add_argument('--model', required=True, help='timm model name (e.g. gradresnet18_joint), or local-dir:/hf-hub: name')
    p.add_argument('--checkpoint', default=None,
                   help='export folder, local-dir:PATH, hf-hub:ORG/NAME or a state-dict file; '
                        'without it, the registry pretrained weights')
    p.add_argument('--num-classes', type=int, default=None, help='classes of a state-dict checkpoint (else inferred)')
    p.add_argument('--dataset', default='', help="timm dataset name ('' for an image folder, torch/cifar10, hfds/...)")
    p.add_argument('--data-dir', default=None)
    p.add_argument('--split', default='validation')
    p.add_argument('--dataset-download', action='store_true')
    p.add_argument('--img-size', type=int, default=None, help="evaluation size (default: the model's config)")
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--max-images', type=int, default=None,
                   help='evaluate N images only, spread evenly over the split')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='decode every image of an image folder once first and leave out those that cannot be read '
                        '(listed in results.json); without it such an image stops the evaluation')
    p.add_argument('--sigmas', type=float, nargs='*', default=[0, 15, 25, 50, 75, 100],
                   help='accuracy / ECE levels (0-255); no values: no accuracy (a dataset without labels)')
    p.add_argument('--psnr-sigmas', type=float, nargs='*', default=[15, 25, 50, 75, 100],
                   help='denoising levels (0-255, > 0)')
    p.add_argument('--grid-images', type=int, default=4, help='rows of the denoising grid')
    p.add_argument('--train-sigma-max', type=float, default=None,
                   help='training range (0-255) to mark, if the checkpoint does not record it')
    p.add_argument('--ood-dataset', default='', help='out-of-distribution dataset (timm name; default: an image folder)')
    p.add_argument('--ood-data-dir', default=None)
    p.add_argument('--ood-split', default='validation')
    p.add_argument('--ood-sigma', type=float, default=0., help='noise level (0-255) of the OOD comparison')
    p.add_argument('--ood-resize', action='store_true', help='accept OOD images of another size (resized)')
    p.add_argument('--attack', nargs='*', default=[], choices=list(ATTACKS), help='PGD attacks to run')
    p.add_argument('--linf-epsilons', type=float, nargs='+', default=[e * 255 for e in DEFAULT_EPSILONS['linf']],
                   help='Linf radii in 1/255 units (8 always added: RobustBench)')
    p.add_argument('--l2-epsilons', type=float, nargs='+', default=DEFAULT_EPSILONS['l2'],
                   help=f'L2 radii on [0, 1] pixels ({ROBUSTBENCH_EPSILONS["l2"]} always added: RobustBench)')
    p.add_argument('--attack-sigmas', type=float, nargs='+', default=[0, 25], help='test-time noise levels (0-255)')
    p.add_argument('--attack-images', type=int, default=100)
    p.add_argument('--attack-steps', type=int, default=20)
    p.add_argument('--reference-model', default=None, help='a standard classifier attacked beside the model')
    p.add_argument('--reference-checkpoint', default=None)
    p.add_argument('--label', default=None,
                   help="the model's name in figures (default: its architecture and training task, e.g. "
                        "'gradresnet_tiny_joint (joint)')")
    p.add_argument('--reference-label', default=None, help="the reference model's name in figures")
    p.add_argument('--certify', action='store_true',
                   help='certified L2 robustness by randomized smoothing (Cohen et al. 2019); the slowest evaluation: '
                        'an estimate of its duration is printed first')
    p.add_argument('--certify-sigmas', type=float, nargs='+', default=[12, 25, 50],
                   help='smoothing noise levels (0-255 units; Cohen et al.\'s 0.12 / 0.25 / 0.5 are 30.6 / 63.75 / 127.5)')
    p.add_argument('--certify-n', type=int, default=10000, help='estimation samples per image (Cohen et al.: 100000)')
    p.add_argument('--certify-n0', type=int, default=100, help='selection samples per image')
    p.add_argument('--certify-alpha', type=float, default=0.001, help='probability that a certificate is wrong')
    p.add_argument('--certify-mode', default='both', choices=('own', 'denoised', 'both'),
                   help="base classifier: the model's logits of the noisy image (own), of its denoised version "
                        "(denoised smoothing), or both; a plain classifier gets own only")
    p.add_argument('--certify-denoiser', default='blind', choices=('blind', 'conditional'),
                   help='denoised smoothing with the blind D(y), or with D(y, c), c the model\'s prediction on y')
    p.add_argument('--certify-images', type=int, default=100, help='images certified (spread over the split)')
    p.add_argument('--certify-batch-size', type=int, default=None,
                   help='noisy copies per forward pass (default: --batch-size; results do not depend on it)')
    p.add_argument('--eigen-k', type=int, default=4, help="Jacobian eigenpairs at each end (0: skip)")
    p.add_argument('--eigen-sigma', type=float, default=25.)
    p.add_argument('--out', default=None, help='output folder (default: eval/<model>)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing results.json')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=None,
                   help='CPU threads (default: OMP_NUM_THREADS, else the idle cores: threads on busy cores stall '
                        'each other)')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; fills the default output folder and records the command."""
    args = parse_command(build_parser(), 'timm_joint.evaluate', argv)
    if args.out is None:
        name = (args.model.split(':', 1)[-1]).strip('/').replace('/', '_') or 'model'
        args.out = str(Path('eval') / name)
    return args


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` and evaluate; bad input raises (ValueError, TypeError, FileExistsError).

    Returns:
        The results dictionary (as written to OUT/results.json).
    """
    return evaluate(parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (timm-joint-evaluate): bad input exits with status 2 and a one-line error."""
    args = parse_args(argv)
    results = run_or_exit('timm_joint.evaluate', lambda: evaluate(args))
    print(render_markdown(results))
    print(f'wrote {Path(args.out) / "results.json"}, {Path(args.out) / "results.md"} and {len(results["figures"])} '
          f'figures in {Path(args.out) / "figures"}')


if __name__ == '__main__':
    main()
