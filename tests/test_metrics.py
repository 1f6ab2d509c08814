"""Metrics on hand-computable cases, and against independent implementations (scikit-image, scikit-learn)."""
import math

import numpy as np
import pytest
import torch

from timm_joint import metrics


def test_top1_correct_by_hand():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    target = torch.tensor([1, 2, 2])
    assert metrics.top1_correct(logits, target).tolist() == [True, False, True]


def test_psnr_by_hand_per_image():
    x = torch.full((2, 3, 5, 7), 0.5, dtype=torch.float64)
    x_hat = x.clone()
    x_hat[0] += 0.1   # MSE 1e-2 -> 20 dB
    x_hat[1] -= 0.01  # MSE 1e-4 -> 40 dB
    out = metrics.psnr(x_hat, x)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([20.0, 40.0], abs=1e-9)


def test_psnr_clamps_the_estimate_only_when_asked():
    x = torch.full((1, 1, 4, 4), 0.1, dtype=torch.float64)
    x_hat = torch.full((1, 1, 4, 4), -0.1, dtype=torch.float64)
    # Clamped to 0: error 0.1 -> 20 dB; raw: error 0.2 -> 10 log10(1 / 0.04).
    assert float(metrics.psnr(x_hat, x)) == pytest.approx(20.0, abs=1e-9)
    assert float(metrics.psnr(x_hat, x, clamp=False)) == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-9)
    # Above the peak, clamping makes the reconstruction exact.
    assert math.isinf(float(metrics.psnr(torch.full((1, 1, 2, 2), 1.5), torch.ones(1, 1, 2, 2))))


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='same shape'):
        metrics.psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 37, 31, generator=g, dtype=torch.float64)
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = metrics.ssim(x_hat, x)
    for i in range(2):
        ref = structural_similarity(
            x_hat[i].numpy(), x[i].numpy(), channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert metrics.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-9)


def test_ece_by_hand():
    # Ten bins. Bin (0.8, 0.9]: two samples at 0.85, one right -> |0.5 - 0.85| * 2/4.
    # Bin (0.6, 0.7]: two samples at 0.65, both right -> |1 - 0.65| * 2/4. ECE = 0.175 + 0.175.
    conf = torch.tensor([0.85, 0.85, 0.65, 0.65], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True])
    value, bins = metrics.ece(conf, correct, num_bins=10)
    assert value == pytest.approx(0.35, abs=1e-12)
    assert bins['count'] == [0, 0, 0, 0, 0, 0, 2, 0, 2, 0]
    assert bins['accuracy'][8] == pytest.approx(0.5) and bins['accuracy'][6] == pytest.approx(1.0)
    assert bins['confidence'][8] == pytest.approx(0.85)
    assert math.isnan(bins['accuracy'][0])
    assert len(bins['edges']) == 11


def test_ece_zero_when_calibrated_and_edges_inclusive():
    conf = torch.tensor([0.75, 0.75, 0.75, 0.75])
    correct = torch.tensor([1, 1, 1, 0])
    value, _ = metrics.ece(conf, correct, num_bins=4)
    assert value == pytest.approx(0.0, abs=1e-12)
    # Confidence 1 falls in the last bin, 0 in the first.
    _, bins = metrics.ece(torch.tensor([1.0, 0.0]), torch.tensor([1, 0]), num_bins=5)
    assert bins['count'] == [1, 0, 0, 0, 1]


def test_auroc_by_hand_with_ties():
    assert metrics.auroc(torch.tensor([3., 2.]), torch.tensor([1., 0.])) == 1.0
    assert metrics.auroc(torch.tensor([0., 1.]), torch.tensor([2., 3.])) == 0.0
    assert metrics.auroc(torch.tensor([1., 1.]), torch.tensor([1., 1.])) == 0.5
    # Pairs: 2>1, 2>0, 1=1 (one half), 1>0 -> 3.5 / 4.
    assert metrics.auroc(torch.tensor([2., 1.]), torch.tensor([1., 0.])) == pytest.approx(0.875)


def test_auroc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    s_in = (torch.randn(57, generator=g) + 0.5).round(decimals=1)  # rounding makes many ties
    s_out = torch.randn(43, generator=g).round(decimals=1)
    ref = roc_auc_score(np.r_[np.ones(57), np.zeros(43)], np.r_[s_in.numpy(), s_out.numpy()])
    assert metrics.auroc(s_in, s_out) == pytest.approx(ref, abs=1e-12)


def test_auroc_needs_both_sides():
    with pytest.raises(ValueError, match='at least one'):
        metrics.auroc(torch.tensor([1.]), torch.tensor([]))
