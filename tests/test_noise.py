"""noise.py: units, sigma validation, the squared-uniform sigma law, and seeded per-sample noise."""
import math

import numpy as np
import pytest
import torch

from timm_joint.noise import (
    STREAM_CLS, STREAM_DEN, STREAM_EVAL, add_noise, check_sigma, from_255, sample_sigma, seeded_noise, to_255)

SHAPE = (3, 7, 5)


def test_units_round_trip():
    assert from_255(25) == pytest.approx(0.09803921568627451)  # 25 / 255 by hand
    assert from_255([15, 25, 50]) == pytest.approx([15 / 255, 25 / 255, 50 / 255])
    assert to_255(from_255(37.5)) == pytest.approx(37.5)
    assert to_255(0.2) == pytest.approx(51.0)


def test_check_sigma_broadcasts_and_keeps_per_sample_values():
    torch.testing.assert_close(check_sigma(0.1, 3), torch.full((3,), 0.1))
    torch.testing.assert_close(check_sigma(np.float32(0.1), 3), torch.full((3,), 0.1))
    torch.testing.assert_close(check_sigma(torch.tensor(0.2), 2), torch.tensor([0.2, 0.2]))
    s = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    out = check_sigma(s, 3, dtype=torch.float64)
    assert out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out, s.detach())


def test_check_sigma_warns_on_0_255_units():
    with pytest.warns(UserWarning, match='did you mean sigma/255'):
        check_sigma(25, 2)
    with pytest.warns(UserWarning, match='did you mean sigma/255'):
        check_sigma(torch.tensor([0.1, 15.]), 2)


def test_add_noise_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    eps = torch.ones(2, 1, 2, 2)
    y = add_noise(x, torch.tensor([0.1, 0.5]), eps)
    assert y[0].unique().tolist() == pytest.approx([0.1]) and y[1].unique().tolist() == pytest.approx([0.5])


def test_seeded_noise_does_not_depend_on_batch_composition():
    idx = [4, 17, 0, 123456]
    sigma, eps = seeded_noise(idx, SHAPE, sigma_max=0.4, seed=7, epoch=3, stream=STREAM_DEN)
    assert sigma.shape == (4,) and eps.shape == (4, *SHAPE)
    for k, i in enumerate(idx):  # one sample at a time
        s1, e1 = seeded_noise([i], SHAPE, sigma_max=0.4, seed=7, epoch=3, stream=STREAM_DEN)
        assert torch.equal(s1[0], sigma[k]) and torch.equal(e1[0], eps[k])
    perm = [2, 0, 3, 1]  # a permuted batch: the same rows, permuted
    sp, ep = seeded_noise(torch.tensor([idx[p] for p in perm]), SHAPE, sigma_max=0.4, seed=7, epoch=3,
                          stream=STREAM_DEN)
    assert torch.equal(sp, sigma[perm]) and torch.equal(ep, eps[perm])


def test_seeded_noise_differs_across_epochs_streams_seeds_and_samples():
    idx = [0, 1, 2]
    base = seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=0, stream=STREAM_CLS)
    others = [
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=1, stream=STREAM_CLS),
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=2, stream=STREAM_CLS),
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=2 ** 32, stream=STREAM_CLS),
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=2 ** 40, epoch=0, stream=STREAM_CLS),
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=0, stream=STREAM_DEN),
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=0, stream=STREAM_EVAL),
        seeded_noise(idx, SHAPE, sigma_max=0.4, seed=1, epoch=0, stream=STREAM_CLS),
    ]
    for sig, eps in others:
        assert not torch.equal(eps, base[1]) and not torch.equal(sig, base[0])
        # Independent draws, not shifted copies: the correlation with the base noise is near 0.
        corr = torch.corrcoef(torch.stack([eps.flatten(), base[1].flatten()]))[0, 1]
        assert abs(float(corr)) < 0.2
    assert not torch.equal(base[1][0], base[1][1])
    again = seeded_noise(idx, SHAPE, sigma_max=0.4, seed=0, epoch=0, stream=STREAM_CLS)
    assert torch.equal(again[0], base[0]) and torch.equal(again[1], base[1])


def test_seeded_noise_fixed_sigma_and_argument_checks():
    sigma, eps = seeded_noise([5, 6], SHAPE, sigma=25 / 255)
    torch.testing.assert_close(sigma, torch.full((2,), 25 / 255))
    # The noise itself does not depend on how sigma is chosen.
    _, eps2 = seeded_noise([5, 6], SHAPE, sigma_max=0.4)
    assert torch.equal(eps, eps2)
    with pytest.raises(ValueError, match='exactly one'):
        seeded_noise([0], SHAPE)
    with pytest.raises(ValueError, match='exactly one'):
        seeded_noise([0], SHAPE, sigma=0.1, sigma_max=0.4)
    with pytest.raises(ValueError, match='>= 0'):
        seeded_noise([-1], SHAPE, sigma=0.1)
    s0, e0 = seeded_noise([], SHAPE, sigma=0.1)
    assert s0.shape == (0,) and e0.shape == (0, *SHAPE)


def _check_squared_uniform(sigma: torch.Tensor, sigma_max: float):
    # sigma = sigma_max * u^2  =>  P(sigma <= q) = sqrt(q / sigma_max). With n samples the empirical
    # CDF has standard deviation <= 0.5 / sqrt(n); allow 5 of them.
    n = sigma.numel()
    assert float(sigma.min()) >= 0 and float(sigma.max()) <= sigma_max
    for q in (0.01, 0.1, 0.25, 0.5, 0.9):
        empirical = float((sigma <= q * sigma_max).double().mean())
        assert abs(empirical - math.sqrt(q)) < 5 * 0.5 / math.sqrt(n), (q, empirical)
    # Mean sigma_max / 3; its standard error is sigma_max * sqrt(1/5 - 1/9) / sqrt(n) < 0.3 sigma_max / sqrt(n).
    assert abs(float(sigma.mean()) - sigma_max / 3) < 5 * 0.3 * sigma_max / math.sqrt(n)


def test_sample_sigma_distribution():
    g = torch.Generator().manual_seed(0)
    sigma = sample_sigma(40_000, 0.4, generator=g)
    assert sigma.shape == (40_000,)
    _check_squared_uniform(sigma, 0.4)
    # Reproducible from a seeded generator.
    assert torch.equal(sample_sigma(5, 0.4, generator=torch.Generator().manual_seed(1)),
                       sample_sigma(5, 0.4, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match='sigma_max'):
        sample_sigma(4, 0.)


def test_seeded_noise_follows_the_same_laws():
    sigma, eps = seeded_noise(range(4000), (1, 1, 4), sigma_max=0.2, seed=3, stream=STREAM_CLS)
    _check_squared_uniform(sigma, 0.2)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05  # 16,000 N(0, 1) draws
