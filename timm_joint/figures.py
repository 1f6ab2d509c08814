"""PNG figures of an evaluation, drawn with matplotlib's Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas rather than pyplot, so
drawing never touches the global backend of a user's session (a notebook keeps its own) and works
without a display. Each function takes plain arrays or the results dictionary and writes one file.
"""
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .io import atomic_file

__all__ = [
    'denoising_grid', 'psnr_vs_sigma', 'robustness_curves', 'certified_accuracy_curves', 'reliability_diagram',
    'eigenvector_figure', 'restoration_grid', 'sample_grid',
]

PathLike = Union[str, Path]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _legend_outside(ax_or_fig, handles=None, labels=None, fontsize: int = 8) -> None:
    """A legend to the right of the axes (or of the whole figure), never over the data; the figure is
    saved with a tight bounding box, which takes it in."""
    kwargs = dict(loc='upper left', fontsize=fontsize, frameon=False, borderaxespad=0.)
    if handles is not None:
        kwargs.update(handles=handles, labels=labels)
    if hasattr(ax_or_fig, 'transAxes'):
        ax_or_fig.legend(bbox_to_anchor=(1.02, 1.0), **kwargs)
    else:  # a figure: beside its last panel
        ax_or_fig.legend(bbox_to_anchor=(1.0, 0.9), bbox_transform=ax_or_fig.transFigure, **kwargs)


def _label(name: str, labels: Optional[Dict[str, str]]) -> str:
    """A model's short label (``--label``, or architecture and task), else its name."""
    return (labels or {}).get(name) or name


def _save(fig, path: PathLike) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format='png', bbox_inches='tight')
    return Path(path)


def _to_hwc(img: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    a = img.detach().cpu().float().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def denoising_grid(
        clean: torch.Tensor,
        noisy: torch.Tensor,
        blind: torch.Tensor,
        cond: torch.Tensor,
        path: PathLike,
        *,
        sigma_255: float,
        titles: Optional[Sequence[str]] = None,
) -> Path:
    """Rows of images: clean, noisy, D(y), D(y, c) and the scaled difference D(y, c) - D(y).

    The difference (the paper's eq. 9: sigma^2 grad log p(c | y)) is shown per row around mid-grey,
    scaled by its largest absolute value so its structure is visible whatever its size.

    Args:
        clean, noisy, blind, cond: Images [N, C, H, W] (pixels in [0, 1]; clamped for display).
        path: Output PNG.
        sigma_255: Noise level (0-255) for the title.
        titles: Optional row labels (e.g. class names).
    """
    n = clean.shape[0]
    cols = ['clean x', f'noisy y (sigma={sigma_255:g})', 'D(y) blind', 'D(y, c)', 'D(y, c) - D(y), scaled']
    fig = _new_figure(2.0 * len(cols), 2.0 * n + 0.4)
    axes = fig.subplots(n, len(cols), squeeze=False)
    for i in range(n):
        diff = (cond[i] - blind[i]).detach().cpu().float()
        scale = float(diff.abs().max())
        diff_img = 0.5 + 0.5 * diff / scale if scale > 0 else torch.full_like(diff, 0.5)
        row = [clean[i], noisy[i], blind[i], cond[i], diff_img]
        for j, img in enumerate(row):
            ax = axes[i][j]
            a = np.clip(_to_hwc(img), 0., 1.)
            ax.imshow(a, cmap='gray' if a.ndim == 2 else None, vmin=0, vmax=1, interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
            if j == 4:
                ax.set_xlabel(f'max |diff| {scale:.3g}', fontsize=7)
        if titles is not None:
            axes[i][0].set_ylabel(str(titles[i]), fontsize=8)
    return _save(fig, path)


def _series(d: Dict[str, object]) -> List[tuple]:
    pts = [(float(k), float(v)) for k, v in d.items() if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sorted(pts)


def _psnr_vs_sigma_figure(
        results: Dict[str, object],
        *,
        train_sigma_max_255: Optional[float] = None,
        title: Optional[str] = None,
):
    """The figure ``psnr_vs_sigma`` writes, not saved (its layout is tested)."""
    fig = _new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    styles = {'blind': ('D(y) blind', '-o'), 'cond_true': ('D(y, c) true class', '--s'),
              'cond_pred': ('D(y, c) predicted class', ':^')}
    xs = []
    for key, (label, style) in styles.items():
        pts = _series(results.get('psnr', {}).get(key, {}))
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=4)
            xs += [x for x, _ in pts]
    pts = _series(results.get('noisy_psnr', {}))
    if pts:
        ax.plot(*zip(*pts), '-', color='grey', label='noisy input y', linewidth=1)
        xs += [x for x, _ in pts]
    x_max = max(xs) if xs else 1.
    x_end = x_max + 0.05 * max(x_max, 1.)
    ax.set_xlim(0, x_end)
    heading = 'PSNR against noise level' + (f': {title}' if title else '')
    if train_sigma_max_255 is not None:
        ax.axvspan(0, min(train_sigma_max_255, x_end), color='tab:green', alpha=0.12,
                   label=f'training range (sigma <= {train_sigma_max_255:g})')
        ax.set_title(heading, fontsize=10)
    else:
        ax.set_title(heading + ' (training range unknown)', fontsize=10)
    ax.set_xlabel('sigma (0-255)')
    ax.set_ylabel('PSNR (dB)')
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def psnr_vs_sigma(
        results: Dict[str, object],
        path: PathLike,
        *,
        train_sigma_max_255: Optional[float] = None,
        title: Optional[str] = None,
) -> Path:
    """PSNR against sigma (0-255) for blind, class-conditional and noisy inputs; training range shaded.

    The sigma axis spans the measured levels (from 0), not the training range: a range beyond the
    data is shaded to the edge and its end given in the legend.

    Args:
        results: The results dictionary (``psnr``, ``noisy_psnr``).
        path: Output PNG.
        train_sigma_max_255: Largest training noise level, shaded [0, sigma_max]; None: nothing marked
            (the title says the range is unknown).
        title: The model's label, shown in the title.
    """
    return _save(_psnr_vs_sigma_figure(results, train_sigma_max_255=train_sigma_max_255, title=title), path)


def _robustness_figure(robustness: Dict[str, object], *, labels: Optional[Dict[str, str]] = None):
    """The figure ``robustness_curves`` writes, not saved (its layout is tested)."""
    acc = robustness['accuracy']
    attacks = sorted({a for per_model in acc.values() for a in per_model})
    units = robustness.get('epsilon_units', {})
    fig = _new_figure(4.5 * len(attacks), 3.8)
    axes = fig.subplots(1, len(attacks), squeeze=False)[0]
    linestyles = ['-', '--', ':', '-.']
    legend = {}
    for ax, a in zip(axes, attacks):
        for mi, (name, per_model) in enumerate(acc.items()):
            for si, (sigma, cells) in enumerate(sorted(per_model.get(a, {}).items(), key=lambda kv: float(kv[0]))):
                pts = _series(cells)
                line, = ax.plot(*zip(*pts), linestyles[mi % len(linestyles)], marker='o', markersize=3,
                                color=f'C{si}')
                legend.setdefault(f'{_label(name, labels)}, sigma={sigma}', line)
        rb = robustness.get('robustbench', {}).get(a)
        if rb is not None:
            legend.setdefault('RobustBench epsilon', ax.axvline(float(rb), linestyle=':', color='grey', linewidth=1))
        ax.set_title(f'{a.upper()} PGD', fontsize=10)
        ax.set_xlabel(f'epsilon ({units.get(a, "")})')
        ax.set_ylabel('robust top-1 (%)')
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _legend_outside(fig, list(legend.values()), list(legend), fontsize=8)
    return fig


def robustness_curves(robustness: Dict[str, object], path: PathLike, *,
                      labels: Optional[Dict[str, str]] = None) -> Path:
    """Robust accuracy against epsilon, one panel per attack, one line per (model, sigma), one legend
    beside the panels.

    Args:
        robustness: The ``robustness`` entry of the results (``accuracy``: {model: {attack: {sigma:
            {epsilon: %}}}}, ``epsilon_units``).
        path: Output PNG.
        labels: {model name: short label} for the legend (default: the names).
    """
    return _save(_robustness_figure(robustness, labels=labels), path)


def _certified_accuracy_figure(certify: Dict[str, object], *, labels: Optional[Dict[str, str]] = None):
    """The figure ``certified_accuracy_curves`` writes, not saved (its layout is tested)."""
    sigmas = list(certify['sigmas'])
    max_radius = certify.get('max_radius', {})
    outside = certify.get('outside_training') or {}
    names = {'own': 'own', 'denoised': 'denoised D(y)', 'denoised_cond': 'denoised D(y, c)'}
    linestyles = {'own': '-', 'denoised': '--', 'denoised_cond': '-.'}
    x_end = 1.05 * max([float(v) for v in max_radius.values()] + [0.25])
    fig = _new_figure(4.0 * len(sigmas), 3.6)
    axes = fig.subplots(1, len(sigmas), squeeze=False, sharey=True)[0]
    legend = {}
    for ax, sigma in zip(axes, sigmas):
        for mi, (name, per_mode) in enumerate(certify['models'].items()):
            for mode, per_sigma in per_mode.items():
                curve = per_sigma[sigma]['curve']
                # Exact step function: accuracy[j] on (radius[j-1], radius[j]], then 0.
                xs = list(curve['radius']) + [x_end]
                ys = list(curve['accuracy']) + [0.]
                line, = ax.step(xs, ys, where='pre', linestyle=linestyles.get(mode, ':'), color=f'C{mi}')
                legend.setdefault(f'{_label(name, labels)}, {names.get(mode, mode)}', line)
                if sigma in (outside.get(name) or []):  # said in the panel: it differs between panels
                    ax.text(0.98, 0.97 - 0.07 * mi, f'{_label(name, labels)}: sigma outside its training noise',
                            transform=ax.transAxes, ha='right', va='top', fontsize=6, color=f'C{mi}')
        if sigma in max_radius:
            legend.setdefault(f'max radius (n={certify.get("n")}, alpha={certify.get("alpha")})',
                              ax.axvline(float(max_radius[sigma]), linestyle=':', color='grey', linewidth=1))
        ax.set_title(f'sigma = {sigma}/255', fontsize=9)
        ax.set_xlabel('L2 radius ([0, 1] pixels)')
        ax.set_xlim(0, x_end)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('certified top-1 (%)')
    fig.tight_layout()
    _legend_outside(fig, list(legend.values()), list(legend), fontsize=7)
    return fig


def certified_accuracy_curves(certify: Dict[str, object], path: PathLike, *,
                              labels: Optional[Dict[str, str]] = None) -> Path:
    """Certified accuracy against L2 radius (Cohen et al.'s figure): one panel per sigma, one exact step
    curve per (model, base classifier), and the largest radius n and alpha can certify at that sigma;
    one legend beside the panels.

    Args:
        certify: The ``certify`` entry of the results (``models``: {name: {mode: {sigma: {'curve':
            {'radius', 'accuracy'}}}}}, ``sigmas``, ``max_radius``, ``n``, ``alpha``).
        path: Output PNG.
        labels: {model name: short label} for the legend (default: the names).
    """
    return _save(_certified_accuracy_figure(certify, labels=labels), path)


def reliability_diagram(bins: Dict[str, List[float]], path: PathLike, *, title: str = '') -> Path:
    """Accuracy per confidence bin against the diagonal, with the bin counts below.

    Args:
        bins: ``ece``'s bins (``edges``, ``count``, ``accuracy``, ``confidence``).
        path: Output PNG.
        title: Figure title (e.g. the ECE and sigma).
    """
    edges = np.asarray(bins['edges'], dtype=np.float64)
    acc = np.asarray(bins['accuracy'], dtype=np.float64)
    count = np.asarray(bins['count'], dtype=np.float64)
    width = np.diff(edges)
    fig = _new_figure(4.5, 5.0)
    ax, ax_n = fig.subplots(2, 1, gridspec_kw={'height_ratios': [3, 1]}, sharex=True)
    ok = np.isfinite(acc)
    ax.bar(edges[:-1][ok], acc[ok], width=width[ok], align='edge', edgecolor='black', alpha=0.7, label='accuracy')
    ax.plot([0, 1], [0, 1], '--', color='grey', label='perfect calibration')
    ax.set_ylabel('accuracy')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _legend_outside(ax)
    ax.set_title(title, fontsize=10)
    ax_n.bar(edges[:-1], count, width=width, align='edge', edgecolor='black', color='tab:grey')
    ax_n.set_xlabel('confidence (max softmax)')
    ax_n.set_ylabel('images')
    return _save(fig, path)


def eigenvector_figure(
        image: torch.Tensor,
        top_values: Sequence[float],
        top_vectors: torch.Tensor,
        bottom_values: Sequence[float],
        bottom_vectors: torch.Tensor,
        path: PathLike,
        *,
        sigma_255: float,
) -> Path:
    """The noisy image and the top / bottom eigenvectors of the denoiser's Jacobian at it.

    Each eigenvector is shown around mid-grey, scaled by its largest absolute value, with its
    eigenvalue above it.

    Args:
        image: The noisy image y [C, H, W].
        top_values, top_vectors: Largest eigenvalues [k] and eigenvectors [k, C, H, W].
        bottom_values, bottom_vectors: Smallest eigenvalues [k] and eigenvectors [k, C, H, W].
        path: Output PNG.
        sigma_255: Noise level of y (0-255).
    """
    k = max(len(top_values), len(bottom_values))
    fig = _new_figure(1.8 * (k + 1), 4.0)
    axes = fig.subplots(2, k + 1, squeeze=False)
    for r, (label, values, vectors) in enumerate((('top', top_values, top_vectors),
                                                  ('bottom', bottom_values, bottom_vectors))):
        ax = axes[r][0]
        ax.imshow(np.clip(_to_hwc(image), 0, 1), interpolation='nearest')
        ax.set_title(f'y (sigma={sigma_255:g})', fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        for j in range(k):
            ax = axes[r][j + 1]
            if j < len(values):
                v = vectors[j].detach().cpu().float()
                v = 0.5 + 0.5 * v / max(float(v.abs().max()), 1e-12)
                a = _to_hwc(v)
                ax.imshow(np.clip(a, 0, 1), cmap='gray' if a.ndim == 2 else None, interpolation='nearest')
                ax.set_title(f'lambda={float(values[j]):.3g}', fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_xticks([])
        axes[r][0].set_yticks([])
    fig.suptitle("eigenvectors of the denoiser's Jacobian", fontsize=10)
    return _save(fig, path)


def _show(ax, img, title: Optional[str] = None, fontsize: int = 7) -> None:
    a = np.clip(_to_hwc(img), 0., 1.)
    ax.imshow(a, cmap='gray' if a.ndim == 2 else None, vmin=0, vmax=1, interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def restoration_grid(grid: Dict[str, Dict[str, object]], path: PathLike, *, title: str = '') -> Path:
    """One row per (problem, image): clean, the measurement's image-space estimate, each prior's
    reconstruction, with its PSNR against the clean image.

    Args:
        grid: {problem: {'clean': [N, C, H, W], 'rows': {label: [N, C, H, W]}}}, the 'rows' in column
            order (the measurement first).
        path: Output PNG.
        title: Figure title (algorithm, noise level).
    """
    from .metrics import psnr
    rows = [(p, i) for p, g in grid.items() for i in range(g['clean'].shape[0])]
    labels = list(next(iter(grid.values()))['rows']) if grid else []
    cols = ['clean'] + labels
    fig = _new_figure(1.7 * len(cols), 1.8 * max(len(rows), 1) + 0.5)
    axes = fig.subplots(max(len(rows), 1), len(cols), squeeze=False)
    for r, (problem, i) in enumerate(rows):
        g = grid[problem]
        clean = g['clean'][i:i + 1]
        _show(axes[r][0], clean[0], 'clean' if r == 0 else None)
        axes[r][0].set_ylabel(problem, fontsize=8)
        for j, label in enumerate(labels):
            img = g['rows'][label][i:i + 1]
            _show(axes[r][j + 1], img[0], f'{label}\n{float(psnr(img, clean)[0]):.2f} dB')
    height = 1.8 * max(len(rows), 1) + 0.5
    fig.subplots_adjust(top=1 - 0.5 / height, bottom=0.2 / height, hspace=0.35, wspace=0.08)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / height)
    return _save(fig, path)


def sample_grid(rows: Dict[str, torch.Tensor], path: PathLike, *, title: str = '') -> Path:
    """Samples, one row per label (e.g. 'KS, class 3'), images clamped to [0, 1].

    Args:
        rows: {label: samples [N, C, H, W]}; rows may hold different numbers of samples.
        path: Output PNG.
        title: Figure title (sampler parameters).
    """
    n_cols = max((int(v.shape[0]) for v in rows.values()), default=1)
    fig = _new_figure(1.1 * n_cols + 1.6, 1.15 * max(len(rows), 1) + 0.5)
    axes = fig.subplots(max(len(rows), 1), n_cols, squeeze=False)
    for r, (label, samples) in enumerate(rows.items()):
        for j in range(n_cols):
            ax = axes[r][j]
            if j < samples.shape[0]:
                _show(ax, samples[j])
            else:
                ax.axis('off')
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha='right', va='center')
    height = 1.15 * max(len(rows), 1) + 0.5
    fig.subplots_adjust(top=1 - 0.45 / height, bottom=0.1 / height, hspace=0.08, wspace=0.05)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / height)
    return _save(fig, path)
