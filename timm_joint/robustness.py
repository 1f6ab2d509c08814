"""Robustness: empirical PGD attacks with foolbox 3, and certified L2 robustness by randomized smoothing.

Attacks bound robustness from above (an attack that fails may have been too weak); certification bounds
it from below. Both are here: ``robust_accuracy_grid`` (PGD over a grid of epsilon and test-time noise
sigma, below) and ``Smooth`` / ``certify_grid`` (the second half of this file).

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
import numbers
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

# _sample_rng: the project's generator keyed by (seed, stream, epoch or phase, sample index).
from .noise import STREAM_EVAL, _sample_rng, check_sigma, seeded_noise
from .protocol import denoise_blind, has_classifier, is_blind, is_denoiser

__all__ = [
    'ATTACKS', 'ROBUSTBENCH_EPSILONS', 'DEFAULT_EPSILONS', 'FixedNoiseClassifier', 'fixed_eval_noise',
    'check_levels', 'level_key', 'epsilon_key', 'noisy_accuracy', 'robust_accuracy_grid',
    'import_foolbox',
    'ABSTAIN', 'CERTIFY_MODES', 'CERTIFY_RADII', 'STREAM_CERT', 'Smooth', 'DenoisedClassifier', 'certify_modes',
    'smoothing_base', 'smoothing_noise', 'check_certify_args', 'min_certify_samples', 'clopper_pearson_lower',
    'certified_radius', 'max_certified_radius', 'certified_accuracy', 'certified_accuracy_curve', 'certify_grid',
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


# -- certified robustness: randomized smoothing ------------------------------------------------------
#
# Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019) turns any base classifier f into the
# smoothed classifier g(x) = argmax_c P(f(x + sigma * eps) = c), eps ~ N(0, I). If the top class has
# probability p_A >= p_lower > 1/2, g is constant on the L2 ball of radius sigma * Phi^-1(p_lower) around x.
# ``Smooth.certify`` estimates p_lower from n Monte Carlo samples with a one-sided Clopper-Pearson bound,
# after choosing the class from n0 other samples, and abstains when the bound is below 1/2; the
# certificate is wrong with probability at most alpha. Denoised smoothing (Salman et al. 2020; Carlini et
# al. 2023 with a diffusion denoiser) smooths y -> f(D(y)) instead: here D is the joint model's own
# denoiser, so one network supplies both (``DenoisedClassifier``).
#
# Radii are L2 norms over all pixels of a [0, 1] image (Cohen et al.'s CIFAR-10 convention: 0.25, 0.5...).

ABSTAIN = -1
# Base classifiers: the model's own logits of the noisy image; the logits of its blind denoiser's output
# D(y); the logits of D(y, c) with c the model's own prediction on y.
CERTIFY_MODES = ('own', 'denoised', 'denoised_cond')
CERTIFY_RADII = (0., 0.25, 0.5, 0.75, 1.0)
# Certification noise has a random stream of its own, apart from noise.py's 1-3 (classification,
# denoising, evaluation) and from data.py's augmentation (+4) and sample-order (+8) offsets of those.
STREAM_CERT = 16
# The three draws of one image: class selection (n0), estimation (n), and ``predict``.
PHASE_SELECT, PHASE_ESTIMATE, PHASE_PREDICT = 0, 1, 2


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be an integer, got {value!r} ({type(value).__name__})')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}')
    return int(value)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f'alpha must be a float in (0, 1), got {alpha!r} ({type(alpha).__name__})')
    if not (math.isfinite(alpha) and 0 < alpha < 1):
        raise ValueError(f'alpha must be in (0, 1) (the probability that a certificate is wrong, e.g. 0.001), '
                         f'got {alpha}')
    return float(alpha)


def min_certify_samples(alpha: float) -> int:
    """The fewest estimation samples n that can certify anything at this alpha.

    When all n samples agree the Clopper-Pearson bound is alpha^(1/n), which reaches 1/2 only for
    n >= log2(1 / alpha) (10 samples at alpha = 0.001); with fewer, every image abstains.
    """
    alpha = _check_alpha(alpha)
    n = max(1, math.ceil(math.log2(1. / alpha) - 1e-9))
    while clopper_pearson_lower(n, n, alpha) < 0.5:  # guard against rounding in the logarithm
        n += 1
    return n


def check_certify_args(n0: int, n: int, alpha: float, batch_size: int) -> Tuple[int, int, float, int]:
    """Validate the settings of ``Smooth.certify``.

    Returns:
        (n0, n, alpha, batch_size) as int, int, float, int.

    Raises:
        TypeError: a count that is not an integer (or a bool), an alpha that is not a number.
        ValueError: n0, n or batch_size below 1, alpha outside (0, 1), or n too small to ever certify at
            alpha (every image would abstain).
    """
    n0 = _check_int(n0, 'n0 (selection samples)')
    n = _check_int(n, 'n (estimation samples)')
    alpha = _check_alpha(alpha)
    batch_size = _check_int(batch_size, 'batch_size')
    n_min = min_certify_samples(alpha)
    if n < n_min:
        raise ValueError(
            f'n={n} estimation samples cannot certify anything at alpha={alpha:g}: even when all of them agree, '
            f'the lower bound alpha^(1/n) = {alpha ** (1. / n):.3f} is below 1/2, so every image would abstain; '
            f'use n >= {n_min} (Cohen et al. use 100,000; 10,000 reaches radius 3.2 sigma at alpha 0.001)')
    return n0, n, alpha, batch_size


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on p from k successes in n Bernoulli(p) trials.

    The lower end of the two-sided Clopper-Pearson ("exact") interval at level 1 - 2 alpha, the bound
    of Cohen et al. (2019): the alpha quantile of Beta(k, n - k + 1), and 0 when k = 0.

    Args:
        k: Successes, 0 <= k <= n.
        n: Trials, >= 1.
        alpha: Probability that the bound exceeds p, in (0, 1).
    """
    from scipy.stats import beta
    n = _check_int(n, 'n')
    k = _check_int(k, 'k', minimum=0)
    if k > n:
        raise ValueError(f'k must be <= n, got k={k}, n={n}')
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.
    return float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """sigma * Phi^-1(p_lower): the L2 radius (pixel units) on which the smoothed classifier is constant.

    Args:
        p_lower: Lower bound on the top class's probability under noise, >= 1/2 (below, nothing is certified).
        sigma: Smoothing noise level (pixel units of [0, 1] images).
    """
    from scipy.stats import norm
    if not 0.5 <= p_lower <= 1:
        raise ValueError(f'p_lower must be in [1/2, 1] to certify a radius, got {p_lower}')
    return float(sigma * norm.ppf(p_lower))


def max_certified_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius n samples can certify at alpha (all of them agreeing): sigma * Phi^-1(alpha^(1/n))."""
    p = clopper_pearson_lower(n, n, alpha)
    return certified_radius(p, sigma) if p >= 0.5 else 0.


def smoothing_noise(
        shape: Sequence[int],
        num: int,
        batch_size: int,
        *,
        seed: int = 0,
        index: int = 0,
        phase: int = PHASE_ESTIMATE,
) -> Iterator[torch.Tensor]:
    """Standard-normal noise for ``num`` noisy copies of one image, in chunks of at most ``batch_size``.

    The draws come, in order, from one generator per (seed, ``STREAM_CERT``, phase, image index)
    (``timm_joint.noise``'s keyed generators), so the concatenated chunks do not depend on
    ``batch_size``, and an image gets the same noise whatever the model, the base classifier, sigma
    (y = x + sigma * eps) or the other images certified with it: comparisons are paired.

    Args:
        shape: Image shape (C, H, W).
        num: Number of noise samples.
        batch_size: Largest chunk.
        seed: Evaluation seed.
        index: The image's dataset index.
        phase: ``PHASE_SELECT``, ``PHASE_ESTIMATE`` or ``PHASE_PREDICT``: independent draws for each.

    Yields:
        Noise chunks [k, C, H, W] in float32 on the CPU, k <= batch_size, summing to ``num``.
    """
    rng = _sample_rng(seed, STREAM_CERT, phase, index)
    remaining = num
    while remaining > 0:
        k = min(batch_size, remaining)
        yield torch.from_numpy(rng.standard_normal((k, *shape), dtype=np.float32))
        remaining -= k


def _check_image(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'x must be a tensor [C, H, W], got {type(x).__name__}')
    if x.ndim != 3:
        raise ValueError(f'x must be one image [C, H, W] (certification is per image), got shape {list(x.shape)}')
    if not x.is_floating_point():
        raise TypeError(f'x must be a float image with pixels in [0, 1], got dtype {x.dtype}')
    return x


class Smooth:
    """Randomized smoothing of a base classifier (Cohen et al. 2019): ``predict`` and ``certify``.

    The smoothed classifier is g(x) = argmax_c P(f(x + sigma * eps) = c). Every sample's noise comes
    from ``smoothing_noise``: results depend on (seed, image index) and on nothing else, not on the
    batch size. Sampling runs under ``torch.no_grad()``; put the base classifier in eval mode first.

    Args:
        base_classifier: Maps noisy images [B, C, H, W] to logits [B, num_classes] (a timm classifier,
            a joint model, or a ``DenoisedClassifier``).
        num_classes: Number of classes of the base classifier.
        sigma: Smoothing noise level in pixel units of [0, 1] images (``25 / 255``), > 0.

    Example:
        >>> import timm, torch, timm_joint
        >>> model = timm.create_model('gradresnet_tiny_joint', num_classes=10).eval()
        >>> smooth = Smooth(model, num_classes=10, sigma=25 / 255)
        >>> prediction, radius = smooth.certify(torch.rand(3, 32, 32), n0=10, n=100, alpha=0.001, batch_size=50)
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float):
        if not callable(base_classifier):
            raise TypeError(
                f'base_classifier must be callable (images -> logits), got {type(base_classifier).__name__}')
        self.base_classifier = base_classifier
        self.num_classes = _check_int(num_classes, 'num_classes')
        self.sigma = float(check_sigma(sigma, 1)[0])

    def sample_counts(
            self,
            x: torch.Tensor,
            num: int,
            batch_size: int,
            *,
            seed: int = 0,
            index: int = 0,
            phase: int = PHASE_ESTIMATE,
    ) -> np.ndarray:
        """How often the base classifier predicts each class on ``num`` noisy copies of x.

        Args:
            x: One clean image [C, H, W].
            num: Noise samples.
            batch_size: Noisy copies per forward pass.
            seed: Evaluation seed.
            index: The image's dataset index (names its noise, with the seed).
            phase: Which draw (see ``smoothing_noise``).

        Returns:
            Counts [num_classes] (int64), summing to ``num``.
        """
        x = _check_image(x)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        with torch.no_grad():
            for eps in smoothing_noise(x.shape, num, batch_size, seed=seed, index=index, phase=phase):
                eps = eps.to(device=x.device, dtype=x.dtype)
                logits = self.base_classifier(x.unsqueeze(0) + self.sigma * eps)
                if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (eps.shape[0], self.num_classes):
                    raise ValueError(
                        f'the base classifier must return logits [B, num_classes] = '
                        f'[{eps.shape[0]}, {self.num_classes}], '
                        f'got {list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}')
                counts += torch.bincount(logits.argmax(1), minlength=self.num_classes).cpu().numpy()
        return counts

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, seed: int = 0,
                index: int = 0) -> int:
        """The smoothed prediction, or ``ABSTAIN`` when the top two classes are not told apart.

        Draws n samples and returns the most frequent class when a two-sided binomial test (scipy's
        ``binomtest``) rejects, at level alpha, that the top two classes are equally likely: the returned
        class differs from g(x) with probability at most alpha.

        Args:
            x: One clean image [C, H, W].
            n: Noise samples, >= 1.
            alpha: Test level in (0, 1).
            batch_size: Noisy copies per forward pass.
            seed: Evaluation seed.
            index: The image's dataset index.

        Returns:
            A class index, or ``ABSTAIN`` (-1).
        """
        from scipy.stats import binomtest
        n = _check_int(n, 'n')
        alpha = _check_alpha(alpha)
        batch_size = _check_int(batch_size, 'batch_size')
        counts = self.sample_counts(x, n, batch_size, seed=seed, index=index, phase=PHASE_PREDICT)
        top2 = np.argsort(-counts, kind='stable')[:2]
        n_a = int(counts[top2[0]])
        n_b = int(counts[top2[1]]) if len(top2) > 1 else 0
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *, seed: int = 0,
                index: int = 0) -> Tuple[int, float]:
        """Certify x: the smoothed prediction and an L2 radius around x on which it cannot change.

        The class c_A is the most frequent one over n0 samples; n further samples count how often the
        base classifier returns c_A, and their Clopper-Pearson lower bound p_lower (at 1 - alpha) gives
        the radius sigma * Phi^-1(p_lower). When p_lower < 1/2 it abstains. The pair is wrong (g(x) is
        not c_A, or not constant on the ball) with probability at most alpha.

        Args:
            x: One clean image [C, H, W], pixels in [0, 1].
            n0: Selection samples, >= 1 (Cohen et al.: 100).
            n: Estimation samples (Cohen et al.: 100,000), enough to certify at alpha (>= 10 at 0.001).
            alpha: Failure probability in (0, 1) (Cohen et al.: 0.001).
            batch_size: Noisy copies per forward pass (results do not depend on it).
            seed: Evaluation seed.
            index: The image's dataset index.

        Returns:
            (class, radius in pixel units of [0, 1] images), or (``ABSTAIN``, 0.0).
        """
        n0, n, alpha, batch_size = check_certify_args(n0, n, alpha, batch_size)
        c_a = int(np.argmax(self.sample_counts(x, n0, batch_size, seed=seed, index=index, phase=PHASE_SELECT)))
        n_a = int(self.sample_counts(x, n, batch_size, seed=seed, index=index, phase=PHASE_ESTIMATE)[c_a])
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.
        return c_a, certified_radius(p_lower, self.sigma)


class DenoisedClassifier(nn.Module):
    """Denoised smoothing's base classifier: noisy images -> logits of their denoised version.

    Salman et al. (2020) and Carlini et al. (2023) put a denoiser D before a classifier f and smooth
    y -> f(D(y)). With a joint model one network is both: D is its blind denoiser D(y) (a forward and a
    backward pass) or, with ``conditional``, D(y, c) with c its own prediction on y, and f is its forward.

    Under ``torch.no_grad()`` with the model in eval mode no graph is built (``denoise`` enables grad
    inside for the input gradient only); a graph is built only when the input requires grad.

    Args:
        denoiser: A model of the denoiser protocol (``timm_joint.protocol``); a non-blind one (as
            DRUNet) is told sigma.
        classifier: Classifies the denoised images (logits [B, K]); default: the denoiser itself.
        sigma: Noise level (pixel units), needed by ``conditional`` and by non-blind denoisers.
        conditional: Denoise with D(y, c), c = argmax of the denoiser's logits of y, instead of D(y).
    """

    def __init__(self, denoiser: nn.Module, classifier: Optional[nn.Module] = None, *,
                 sigma: Optional[float] = None, conditional: bool = False):
        super().__init__()
        if not is_denoiser(denoiser):
            raise TypeError(
                f'denoiser must have a denoise(y, sigma=None, c=None) method, got {type(denoiser).__name__}')
        needs_sigma = conditional or not is_blind(denoiser)
        if needs_sigma and sigma is None:
            raise ValueError('a class-conditional or non-blind denoiser needs the noise level: pass sigma=')
        self.denoiser = denoiser
        self.classifier = classifier if classifier is not None else denoiser
        self.sigma = None if sigma is None else float(sigma)
        self.conditional = conditional

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of D(y) (or D(y, c)) for noisy images y [B, C, H, W]."""
        if self.conditional:
            c = self.denoiser(y).argmax(-1)
            d = self.denoiser.denoise(y, sigma=self.sigma, c=c)
        else:
            d = denoise_blind(self.denoiser, y, self.sigma)
        return self.classifier(d)


def certify_modes(model: nn.Module) -> Tuple[str, ...]:
    """The base classifiers a model supports: 'own' if it classifies, the denoised ones if it also denoises."""
    if not has_classifier(model):
        return ()
    if is_denoiser(model):
        return CERTIFY_MODES
    return ('own',)


def smoothing_base(model: nn.Module, mode: str, sigma: float) -> nn.Module:
    """The base classifier of one mode: the model itself ('own') or a ``DenoisedClassifier`` around it.

    Raises:
        ValueError: an unknown mode, or a denoised mode for a model without a denoiser.
    """
    if mode not in CERTIFY_MODES:
        raise ValueError(f'mode must be one of {CERTIFY_MODES}, got {mode!r}')
    if mode not in certify_modes(model):
        raise ValueError(f'base classifier {mode!r} needs a model that classifies'
                         + (' and denoises' if mode != 'own' else '') + f'; {type(model).__name__} does not')
    if mode == 'own':
        return model
    return DenoisedClassifier(model, sigma=sigma, conditional=mode == 'denoised_cond')


def certified_accuracy(radii: Sequence[float], correct: Sequence[bool], radius: float) -> float:
    """Certified accuracy (%) at one radius: images certified correct with a radius >= ``radius``."""
    if len(radii) != len(correct):
        raise ValueError(f'radii and correct must have the same length, got {len(radii)} and {len(correct)}')
    hits = sum(1 for r, ok in zip(radii, correct) if ok and r >= radius)
    return 100. * hits / max(len(radii), 1)


def certified_accuracy_curve(radii: Sequence[float], correct: Sequence[bool]) -> Dict[str, List[float]]:
    """The whole certified-accuracy curve, exactly: a step function of the radius.

    Returns:
        {'radius': [0, r_1, ..., r_m], 'accuracy': [%]}: r_j the distinct radii of the correctly certified
        images in increasing order; the accuracy is ``accuracy[j]`` on (radius[j-1], radius[j]] (matplotlib's
        ``step(where='pre')``) and 0 beyond r_m.
    """
    breaks = sorted({float(r) for r, ok in zip(radii, correct) if ok and r > 0})
    points = [0.] + breaks
    return {'radius': points, 'accuracy': [certified_accuracy(radii, correct, r) for r in points]}


def _format_duration(seconds: float) -> str:
    if seconds < 90:
        return f'{seconds:.0f} s'
    if seconds < 5400:
        return f'{seconds / 60:.1f} min'
    return f'{seconds / 3600:.1f} h'


def certify_grid(
        models: Mapping[str, nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int],
        *,
        sigmas: Sequence[float],
        modes: Sequence[str] = ('own', 'denoised'),
        n0: int = 100,
        n: int = 10000,
        alpha: float = 0.001,
        batch_size: int = 256,
        seed: int = 0,
        radii: Sequence[float] = CERTIFY_RADII,
        progress: bool = False,
        log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Certified accuracy of several models, base classifiers and noise levels on the same images and noise.

    Each image gets its noise from (seed, its dataset index) (``smoothing_noise``): every model, mode and
    sigma sees the same eps. Before the long run one batch per model and mode is timed and the total
    extrapolated; ``log`` receives that estimate.

    Args:
        models: {name: classifier}, each mapping [B, C, H, W] pixels in [0, 1] to logits [B, K], with a
            ``num_classes`` attribute.
        images: Clean images [N, C, H, W] in [0, 1], on the models' device.
        labels: Classes [N].
        indices: Dataset indices [N] that seed each image's noise.
        sigmas: Smoothing noise levels in pixel units, > 0.
        modes: Base classifiers (``CERTIFY_MODES``); a model gets those it supports (``certify_modes``), and
            the others are listed under ``skipped``.
        n0, n, alpha, batch_size: As in ``Smooth.certify``.
        seed: Noise seed.
        radii: L2 radii (pixel units) at which the accuracy is reported; the full curve is reported too.
        progress: Show a tqdm progress bar (one step per image and cell).
        log: Called with one line: the plan and its estimated duration.

    Returns:
        A JSON-able dict: the settings; ``index`` and ``label`` [N]; ``max_radius`` {sigma key: radius n and
        alpha can reach}; ``models`` {name: {mode: {sigma key (0-255): {'accuracy': {radius key: %},
        'abstain': %, 'curve': {'radius', 'accuracy'}, 'prediction': [N] (-1: abstain), 'radius': [N],
        'time_s'}}}}; ``skipped`` {name: [modes]}; ``estimated_s`` and ``time_s``.

    Raises:
        TypeError, ValueError: bad settings or inputs, before any work.
    """
    from tqdm import tqdm

    n0, n, alpha, batch_size = check_certify_args(n0, n, alpha, batch_size)
    sigmas = check_levels(sigmas, 'sigmas')
    if not sigmas or any(s <= 0 for s in sigmas):
        raise ValueError(f'sigmas must be a non-empty list of noise levels > 0 (pixel units), got {sigmas}')
    radii = sorted(set(check_levels(radii, 'radii')))
    unknown = [m for m in modes if m not in CERTIFY_MODES]
    if unknown or not modes:
        raise ValueError(f'modes must be a non-empty subset of {CERTIFY_MODES}, got {list(modes)}')
    if not models:
        raise ValueError('models must name at least one classifier')
    if images.ndim != 4 or labels.shape != (images.shape[0],) or len(indices) != images.shape[0] or not len(indices):
        raise ValueError(
            f'expected images [N, C, H, W], labels [N] and indices [N] with N >= 1, got {list(images.shape)}, '
            f'{list(labels.shape)} and {len(indices)} indices')
    if not images.is_floating_point() or float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError('certification needs clean float images with pixels in [0, 1]')
    cells, skipped = [], {}
    for name, model in models.items():
        k = getattr(model, 'num_classes', 0)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f'model {name!r} has no classifier (num_classes = {k!r}): nothing to certify')
        supported = certify_modes(model)
        for mode in modes:
            (cells.append((name, mode)) if mode in supported else skipped.setdefault(name, []).append(mode))
    if not cells:
        raise ValueError(f'no model supports the base classifiers {list(modes)}')

    indices = [int(i) for i in indices]
    n_images = images.shape[0]
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    out_models: Dict[str, Dict[str, Dict[str, Any]]] = {}
    try:
        # 1. Time one batch per (model, mode) at the first sigma and extrapolate.
        per_sample = {}
        k = min(batch_size, n0 + n)
        for name, mode in cells:
            smooth = Smooth(smoothing_base(models[name], mode, sigmas[0]), models[name].num_classes, sigmas[0])
            # A full-size warm-up batch first: the first one pays for allocations (it read 1.5x slow here).
            smooth.sample_counts(images[0], k, batch_size, seed=seed, index=indices[0], phase=PHASE_PREDICT)
            t0 = time.perf_counter()
            smooth.sample_counts(images[0], k, batch_size, seed=seed, index=indices[0])
            per_sample[(name, mode)] = (time.perf_counter() - t0) / k
        estimated = sum(per_sample.values()) * len(sigmas) * n_images * (n0 + n)
        if log is not None:
            log(f'certify: {len(cells)} base classifier(s) x {len(sigmas)} sigma(s) x {n_images} images x '
                f'{n0 + n:,} samples = {len(cells) * len(sigmas) * n_images * (n0 + n):,} evaluations; estimated '
                f'{_format_duration(estimated)} (one batch of {k} timed per base classifier)')

        # 2. Certify.
        t_start = time.perf_counter()
        labels_list = [int(c) for c in labels.tolist()]
        with tqdm(total=len(cells) * len(sigmas) * n_images, desc='certify', unit='img', disable=not progress,
                  file=sys.stderr) as bar:
            for name, mode in cells:
                model = models[name]
                for sigma in sigmas:
                    bar.set_postfix_str(f'{name}, {mode}, sigma={level_key(sigma * 255.)}')
                    smooth = Smooth(smoothing_base(model, mode, sigma), model.num_classes, sigma)
                    t0 = time.perf_counter()
                    predictions, certified = [], []
                    for i in range(n_images):
                        c, r = smooth.certify(images[i], n0, n, alpha, batch_size, seed=seed, index=indices[i])
                        predictions.append(c)
                        certified.append(r)
                        bar.update(1)
                    correct = [p == c for p, c in zip(predictions, labels_list)]
                    out_models.setdefault(name, {}).setdefault(mode, {})[level_key(sigma * 255.)] = {
                        'accuracy': {level_key(r): certified_accuracy(certified, correct, r) for r in radii},
                        'abstain': 100. * sum(p == ABSTAIN for p in predictions) / n_images,
                        'curve': certified_accuracy_curve(certified, correct),
                        'prediction': predictions,
                        'radius': certified,
                        'time_s': round(time.perf_counter() - t0, 3),
                    }
    finally:
        for name, m in models.items():
            m.train(was_training[name])

    return {
        'method': 'randomized smoothing (Cohen et al. 2019): Clopper-Pearson lower bound, abstain below 1/2',
        'num_images': n_images, 'n0': n0, 'n': n, 'alpha': alpha, 'batch_size': batch_size, 'seed': seed,
        'sigmas': [level_key(s * 255.) for s in sigmas],
        'radii': [level_key(r) for r in radii],
        'modes': list(modes),
        'units': {'sigma': '0-255', 'radius': 'L2 norm, [0, 1] pixels', 'accuracy': '% certified top-1'},
        'max_radius': {level_key(s * 255.): max_certified_radius(n, alpha, s) for s in sigmas},
        'index': indices,
        'label': labels_list,
        'models': out_models,
        'skipped': skipped,
        'estimated_s': round(estimated, 2),
        'time_s': round(time.perf_counter() - t_start, 2),
    }
