"""Evaluation metrics as pure functions of tensors, one value per sample where that makes sense.

Every function works on a batch and returns per-image values ([B]) so that the caller averages over
the whole dataset (DESIGN §2: PSNR per image, then averaged over images). Nothing here touches a
model, a dataset or a random generator.

Conventions:
    * images are [B, C, H, W] with pixels in [0, 1] (peak value 1);
    * a restored image is clamped to [0, 1] before it is scored (``clamp=True``), as a saved image
      would be; pass ``clamp=False`` to score the raw values (e.g. the noisy input itself);
    * out-of-distribution scores are "higher means more in-distribution".
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

__all__ = ['top1_correct', 'psnr', 'ssim', 'ece', 'auroc', 'gaussian_window']


def _check_pair(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if not (isinstance(x_hat, torch.Tensor) and isinstance(x, torch.Tensor)):
        raise TypeError('expected two image tensors [B, C, H, W]')
    if x_hat.shape != x.shape or x.ndim != 4:
        raise ValueError(
            f'expected two image tensors of the same shape [B, C, H, W], got {list(x_hat.shape)} and {list(x.shape)}')


def top1_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Whether the highest logit is the target class.

    Args:
        logits: Class scores [B, K].
        target: Class indices [B] (integer).

    Returns:
        Correctness [B], bool.
    """
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f'expected logits [B, K] and targets [B], got {list(logits.shape)} and {list(target.shape)}')
    return logits.argmax(dim=1) == target.to(logits.device)


def psnr(x_hat: torch.Tensor, x: torch.Tensor, *, data_range: float = 1.0, clamp: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image, in dB.

    PSNR = 10 log10(data_range^2 / MSE), the MSE taken over the channels and pixels of one image.
    An exact reconstruction gives +inf.

    Args:
        x_hat: Estimates [B, C, H, W].
        x: References [B, C, H, W], pixels in [0, data_range].
        data_range: Peak value (1 for [0, 1] images).
        clamp: Clamp ``x_hat`` to [0, data_range] first.

    Returns:
        PSNR [B] in dB (float64).
    """
    _check_pair(x_hat, x)
    x_hat = x_hat.detach().double()
    if clamp:
        x_hat = x_hat.clamp(0., data_range)
    mse = (x_hat - x.detach().double()).pow(2).flatten(1).mean(1)
    return 10. * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A normalised 1-d Gaussian window [size] (SSIM's default: 11 taps, sigma 1.5)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f'the window size must be odd and positive, got {size}')
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


def ssim(
        x_hat: torch.Tensor,
        x: torch.Tensor,
        *,
        data_range: float = 1.0,
        clamp: bool = True,
        window_size: int = 11,
        window_sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity of each image (Wang et al. 2004, Gaussian window).

    Local means, variances and the covariance are Gaussian-weighted averages over a
    ``window_size`` window (population statistics); the SSIM map is computed where the window fits
    inside the image ('valid') and averaged over positions and channels. Images smaller than the
    window use a window of their smaller side (made odd).

    Args:
        x_hat: Estimates [B, C, H, W].
        x: References [B, C, H, W], pixels in [0, data_range].
        data_range: Peak value.
        clamp: Clamp ``x_hat`` to [0, data_range] first.
        window_size: Taps of the Gaussian window (odd).
        window_sigma: Standard deviation of the window, in pixels.
        k1: Stabiliser of the luminance term, C1 = (k1 * data_range)^2.
        k2: Stabiliser of the contrast-structure term, C2 = (k2 * data_range)^2.

    Returns:
        SSIM [B] (float64), 1 for identical images.
    """
    _check_pair(x_hat, x)
    x_hat = x_hat.detach().double()
    if clamp:
        x_hat = x_hat.clamp(0., data_range)
    x = x.detach().double()
    c = x.shape[1]
    size = min(window_size, x.shape[-2], x.shape[-1])
    size = size if size % 2 == 1 else size - 1
    w1 = gaussian_window(size, window_sigma).to(x.device)
    # A separable 2-d window, applied per channel (grouped convolution).
    w2 = (w1[:, None] * w1[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w2, groups=c)

    mu_x, mu_y = blur(x_hat), blur(x)
    var_x = blur(x_hat * x_hat) - mu_x ** 2
    var_y = blur(x * x) - mu_y ** 2
    cov = blur(x_hat * x) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def ece(
        confidence: torch.Tensor,
        correct: torch.Tensor,
        *,
        num_bins: int = 15,
) -> Tuple[float, Dict[str, List[float]]]:
    """Expected calibration error with equal-width confidence bins.

    Bin i holds the samples with confidence in (i/n, (i+1)/n] (the first bin also holds 0).
    ECE = sum_i (n_i / N) |accuracy_i - mean confidence_i|.

    Args:
        confidence: Predicted probability of the predicted class [N], in [0, 1].
        correct: Whether the prediction was right [N] (bool or 0/1).
        num_bins: Number of equal-width bins.

    Returns:
        (ECE as a fraction in [0, 1], reliability-diagram bins: ``edges`` [n+1], and per bin
        ``count``, ``accuracy`` and ``confidence`` [n], the last two NaN for empty bins).
    """
    if confidence.ndim != 1 or correct.shape != confidence.shape:
        raise ValueError(
            f'expected confidence [N] and correct [N], got {list(confidence.shape)} and {list(correct.shape)}')
    if num_bins < 1:
        raise ValueError(f'num_bins must be >= 1, got {num_bins}')
    conf = confidence.detach().double().cpu()
    if conf.numel() and (bool((conf < 0).any()) or bool((conf > 1).any())):
        raise ValueError('confidences must lie in [0, 1]')
    corr = correct.detach().double().cpu()
    edges = torch.linspace(0., 1., num_bins + 1, dtype=torch.float64)
    # Right-closed bins: bucketize(v, edges[1:-1], right=False) gives i with edges[i] < v <= edges[i+1].
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=num_bins).double()
    sum_acc = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, corr)
    sum_conf = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, conf)
    n = max(conf.numel(), 1)
    value = float((sum_acc - sum_conf).abs().sum() / n)
    nan = torch.full_like(count, float('nan'))
    nonempty = count > 0
    acc_bin = torch.where(nonempty, sum_acc / count.clamp_min(1), nan)
    conf_bin = torch.where(nonempty, sum_conf / count.clamp_min(1), nan)
    bins = {
        'edges': edges.tolist(),
        'count': [int(c) for c in count.tolist()],
        'accuracy': acc_bin.tolist(),
        'confidence': conf_bin.tolist(),
    }
    return value, bins


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve for telling in-distribution (higher score) from out-of-distribution.

    Computed from ranks (the Mann-Whitney U statistic): the probability that a random
    in-distribution sample scores higher than a random out-of-distribution one, ties counting 1/2.

    Args:
        scores_in: Scores of in-distribution samples [N].
        scores_out: Scores of out-of-distribution samples [M].

    Returns:
        AUROC in [0, 1] (0.5 is chance).
    """
    s_in = scores_in.detach().double().flatten().cpu()
    s_out = scores_out.detach().double().flatten().cpu()
    n, m = s_in.numel(), s_out.numel()
    if n == 0 or m == 0:
        raise ValueError(f'AUROC needs at least one score on each side, got {n} and {m}')
    if not (bool(torch.isfinite(s_in).all()) and bool(torch.isfinite(s_out).all())):
        raise ValueError('AUROC scores must be finite')
    allv = torch.cat([s_in, s_out])
    order = torch.argsort(allv, stable=True)
    sorted_v = allv[order]
    # Average ranks (1-based) over runs of equal values, so ties count one half.
    uniq, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank_of_group = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(allv)
    ranks[order] = avg_rank_of_group[inverse]
    u = ranks[:n].sum() - n * (n + 1) / 2
    return float(u / (n * m))
