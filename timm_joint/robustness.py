"""Adversarial robustness with foolbox 3: PGD over a grid of (epsilon, test-time noise sigma).

A classifier evaluated on noisy inputs is attacked at each noise level sigma through a deterministic
module, ``FixedNoiseClassifier``: x -> logits(x + sigma * eps), where eps is drawn once per image from
the seeded evaluation stream (``timm_joint.noise.seeded_noise``) and then held fixed. The forward is
therefore deterministic and differentiable end to end: the attack sees the true gradient of what is
scored (no gradient masking by resampled noise), and epsilon 0 reproduces the clean accuracy at that
sigma exactly, with the same noise that ``python -m timm_joint.evaluate`` uses for its accuracy table.

Units: in Python, sigma and epsilon are in pixel units of [0, 1] images (Linf 8/255, L2 0.5). In
result keys, sigma and Linf epsilons are written in the 0-255 convention ("25", "8"); L2 epsilons as
they are ("0.5"), the L2 norm being taken over all pixels of a [0, 1] image (RobustBench's convention).
"""
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .noise import STREAM_EVAL, seeded_noise

__all__ = [
    'ATTACKS', 'ROBUSTBENCH_EPSILONS', 'DEFAULT_EPSILONS', 'FixedNoiseClassifier', 'fixed_eval_noise',
    'check_levels', 'level_key', 'epsilon_key', 'noisy_accuracy', 'robust_accuracy_grid',
    'import_foolbox',
]

ATTACKS = ('linf', 'l2')
# RobustBench's CIFAR thresholds; always part of a grid built here.
ROBUSTBENCH_EPSILONS = {'linf': 8 / 255, 'l2': 0.5}
DEFAULT_EPSILONS = {
    'linf': [0., 1 / 255, 2 / 255, 4 / 255, 8 / 255],
    'l2': [0., 0.125, 0.25, 0.5, 1.0],
}


def import_foolbox():
    """Import foolbox 3; its GitPython import needs a git binary unless told to stay quiet."""
    os.environ.setdefault('GIT_PYTHON_REFRESH', 'quiet')
    import warnings
    with warnings.catch_warnings():
        # foolbox 3.3.4 imports scipy.ndimage.filters, deprecated by SciPy: not ours to fix.
        warnings.simplefilter('ignore', DeprecationWarning)
        import foolbox
    return foolbox


def check_levels(values: Iterable[float], name: str) -> List[float]:
    """Validate noise levels or epsilons: finite and >= 0 (0 is allowed: clean / no attack).

    Raises:
        ValueError: a negative or non-finite value, naming the option.
    """
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f'{name} must be numbers, got {v!r}')
        if not math.isfinite(v) or v < 0:
            raise ValueError(f'{name} must be finite and >= 0, got {v}')
        out.append(float(v))
    return out


def level_key(sigma_255: float) -> str:
    """Result key of a level in the 0-255 convention: 25.0 -> '25', 12.5 -> '12.5'."""
    return f'{round(float(sigma_255), 4):g}'


def epsilon_key(attack: str, epsilon: float) -> str:
    """Result key of an epsilon (pixel units): Linf in 0-255 units ('8'), L2 as is ('0.5')."""
    return level_key(epsilon * 255.) if attack == 'linf' else level_key(epsilon)


def fixed_eval_noise(
        indices: Sequence[int],
        shape: Sequence[int],
        *,
        seed: int = 0,
) -> torch.Tensor:
    """The fixed standard-normal noise eps of each image of the evaluation stream, [B, C, H, W].

    The same tensor serves every sigma (y = x + sigma * eps), the accuracy table, the denoising
    metrics and the attacks, so all of them score the same noisy images.
    """
    _, eps = seeded_noise(indices, tuple(shape), sigma=1.0, seed=seed, stream=STREAM_EVAL)
    return eps


class FixedNoiseClassifier(nn.Module):
    """logits(x + sigma * eps) with eps fixed: a deterministic, differentiable noisy classifier.

    Args:
        model: A classifier mapping images [B, C, H, W] to logits [B, K].
        sigma: Test-time noise level (pixel units), >= 0.
        eps: Fixed standard-normal noise [B, C, H, W], one per image of the batch being attacked.
    """

    def __init__(self, model: nn.Module, sigma: float, eps: torch.Tensor):
        super().__init__()
        self.model = model
        self.sigma = float(sigma)
        self.register_buffer('eps', eps, persistent=False)
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.eps.shape:
            raise ValueError(f'expected inputs of shape {list(self.eps.shape)}, got {list(x.shape)}')
        if self.sigma == 0:
            return self.model(x)
        return self.model(x + self.sigma * self.eps.to(x))


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def noisy_accuracy(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int],
        *,
        sigma: float,
        seed: int = 0,
        batch_size: int = 64,
) -> float:
    """Top-1 accuracy (%) on x + sigma * eps with the fixed evaluation noise; no attack.

    Args:
        model: Classifier (put in eval mode by the caller).
        images: Clean images [N, C, H, W] in [0, 1].
        labels: Classes [N].
        indices: Dataset indices [N] that seed the noise.
        sigma: Noise level (pixel units), >= 0.
        seed: Evaluation seed.
        batch_size: Images per forward pass.
    """
    check_levels([sigma], 'sigma')
    device = images.device
    correct = 0
    for sl in _batches(images.shape[0], batch_size):
        x = images[sl]
        eps = fixed_eval_noise(list(indices[sl]), x.shape[1:], seed=seed).to(device)
        logits = model(x + sigma * eps.to(x))
        correct += int((logits.argmax(1) == labels[sl].to(device)).sum())
    return 100. * correct / max(images.shape[0], 1)


def _with_robustbench(attack: str, epsilons: Sequence[float]) -> List[float]:
    eps = sorted(set(float(e) for e in epsilons))
    ref = ROBUSTBENCH_EPSILONS[attack]
    if not any(abs(e - ref) < 1e-9 for e in eps):
        eps = sorted(eps + [ref])
    return eps


def _make_attack(fb, attack: str, steps: int, rel_stepsize: float, random_start: bool):
    if attack == 'linf':
        return fb.attacks.LinfPGD(steps=steps, rel_stepsize=rel_stepsize, random_start=random_start)
    return fb.attacks.L2PGD(steps=steps, rel_stepsize=rel_stepsize, random_start=random_start)


def robust_accuracy_grid(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int],
        *,
        attacks: Sequence[str] = ATTACKS,
        epsilons: Optional[Dict[str, Sequence[float]]] = None,
        sigmas: Sequence[float] = (0.,),
        steps: int = 20,
        rel_stepsize: Optional[float] = None,
        random_start: bool = True,
        include_robustbench: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Robust top-1 accuracy (%) of one classifier for each (attack, sigma, epsilon) cell.

    Each cell attacks ``FixedNoiseClassifier(model, sigma, eps)`` with foolbox's PGD; an image counts
    as robust when the attack fails at that epsilon (a misclassified clean image never does). At
    epsilon 0 the result is the accuracy on x + sigma * eps, the same number ``noisy_accuracy`` gives.
    Random starts are drawn under ``torch.random.fork_rng`` from a generator seeded per cell, so
    results are reproducible and the global random state is left untouched.

    Args:
        model: Classifier mapping [B, C, H, W] pixels in [0, 1] to logits [B, K].
        images: Clean images [N, C, H, W] in [0, 1], on the model's device.
        labels: Classes [N].
        indices: Dataset indices [N] that seed the fixed noise.
        attacks: Subset of ('linf', 'l2').
        epsilons: Per attack, the radii in pixel units (defaults: ``DEFAULT_EPSILONS``).
        sigmas: Test-time noise levels in pixel units (0 is the clean classifier).
        steps: PGD iterations.
        rel_stepsize: Step size relative to epsilon; default 2.5 / steps (Madry et al.'s rule: the
            iterates can cross the ball and come back).
        random_start: Start from a random point in the ball.
        include_robustbench: Add RobustBench's threshold (Linf 8/255, L2 0.5) when missing.
        seed: Noise and random-start seed.
        batch_size: Images per attack batch.
        progress: Called with the number of images finished after each batch and cell.

    Returns:
        {attack: {sigma key (0-255): {epsilon key: robust accuracy in %}}}.

    Raises:
        ValueError: an unknown attack, a negative epsilon or sigma, or mismatched inputs (before any work).
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f'attacks must be a non-empty subset of {ATTACKS}, got {list(attacks)}')
    sigmas = check_levels(sigmas, 'sigmas')
    epsilons = dict(epsilons or {})
    grid_eps = {}
    for a in attacks:
        eps = check_levels(epsilons.get(a, DEFAULT_EPSILONS[a]), f'{a} epsilons')
        grid_eps[a] = _with_robustbench(a, eps) if include_robustbench else sorted(set(eps))
    if images.ndim != 4 or labels.shape != (images.shape[0],) or len(indices) != images.shape[0]:
        raise ValueError(
            f'expected images [N, C, H, W], labels [N] and indices [N], got {list(images.shape)}, '
            f'{list(labels.shape)} and {len(indices)} indices')
    if steps < 1:
        raise ValueError(f'steps must be >= 1, got {steps}')
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError('attacks need clean images with pixels in [0, 1]')
    fb = import_foolbox()
    rel_stepsize = 2.5 / steps if rel_stepsize is None else rel_stepsize

    was_training = model.training
    model.eval()
    device = images.device
    n = images.shape[0]
    robust = {a: {s: torch.zeros(len(grid_eps[a]), dtype=torch.long) for s in range(len(sigmas))} for a in attacks}
    try:
        for b, sl in enumerate(_batches(n, batch_size)):
            x, y = images[sl], labels[sl].to(device)
            eps_noise = fixed_eval_noise(list(indices[sl]), x.shape[1:], seed=seed).to(device=device, dtype=x.dtype)
            for si, sigma in enumerate(sigmas):
                fmodel = fb.PyTorchModel(FixedNoiseClassifier(model, sigma, eps_noise), bounds=(0, 1), device=device)
                for ai, a in enumerate(attacks):
                    attack = _make_attack(fb, a, steps, rel_stepsize, random_start)
                    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
                        if device.type == 'cuda' else []
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(((seed * 100003 + b) * 1009 + si) * 7 + ai)
                        _, _, success = attack(fmodel, x, y, epsilons=grid_eps[a])
                    robust[a][si] += (~success).sum(dim=1).cpu()
                    if progress is not None:
                        progress(x.shape[0])
    finally:
        model.train(was_training)

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for a in attacks:
        out[a] = {}
        for si, sigma in enumerate(sigmas):
            out[a][level_key(sigma * 255.)] = {
                epsilon_key(a, e): 100. * int(robust[a][si][ei]) / max(n, 1) for ei, e in enumerate(grid_eps[a])}
    return out
