"""Gaussian textures: the sampler against its spectrum, the closed-form likelihood against a dense Gaussian."""
import numpy as np
import pytest
import torch

from timm_joint import textures


@pytest.mark.parametrize('kind', list(textures.KINDS))
def test_sample_periodogram_matches_spectrum(kind):
    # Path 1: the spectrum formula. Path 2: the mean periodogram of drawn fields (colour-decorrelated).
    size, n = 16, 4000
    x = textures.sample(kind, n, size, rng=np.random.default_rng(0), mean=0., std=1.)
    z = np.einsum('ij,njhw->nihw', np.linalg.inv(textures.COLOUR_MIX), x)
    power = (np.abs(np.fft.fft2(z)) ** 2 / size ** 2).mean((0, 1))
    p = textures.spectrum(kind, size)
    mask = p > 0
    # n * 3 fields: each periodogram value has relative standard error ~ 1 / sqrt(n * 3) ~ 1 %
    np.testing.assert_allclose(power[mask], p[mask], rtol=0.08)
    assert abs(power[0, 0]) < 1e-8  # zero mean field
    assert np.isclose(x.var(), 1., rtol=0.02)  # unit variance, whatever the spectrum


def test_bayes_log_likelihood_matches_dense_gaussian():
    # Path 1: the Fourier-diagonal formula. Path 2: a dense covariance built pixel by pixel, scored by
    # torch's MultivariateNormal. The two agree up to a constant shared by all classes.
    size, sigma, std = 4, 0.05, 0.1
    kinds = list(textures.KINDS)
    rng = np.random.default_rng(1)
    y = torch.tensor(textures.sample('pink', 5, size, rng=rng, std=std)) + sigma * torch.randn(5, 3, size, size,
                                                                                          dtype=torch.float64)
    fast = textures.bayes_log_likelihood(y, sigma, kinds=kinds, std=std)
    dense = []
    for kind in kinds:
        p = textures.spectrum(kind, size)
        # stationary covariance of one channel: c(d) = ifft2(P)(d) (circular), then the colour mixing
        c = np.fft.ifft2(p).real
        idx = np.arange(size)
        dy = (idx[:, None, None, None] - idx[None, None, :, None]) % size
        dx = (idx[None, :, None, None] - idx[None, None, None, :]) % size
        k_space = c[dy, dx].reshape(size * size, size * size)
        cov = np.kron(textures.COLOUR_MIX @ textures.COLOUR_MIX.T, k_space) * std ** 2
        cov += sigma ** 2 * np.eye(cov.shape[0])
        mvn = torch.distributions.MultivariateNormal(torch.full((cov.shape[0],), 0.5, dtype=torch.float64),
                                                     covariance_matrix=torch.tensor(cov))
        dense.append(mvn.log_prob(y.reshape(5, -1)))
    dense = torch.stack(dense, 1)
    diff = fast - dense
    torch.testing.assert_close(diff - diff[:, :1], torch.zeros_like(diff), atol=1e-6, rtol=0)
    torch.testing.assert_close(diff, diff[:1].expand_as(diff), atol=1e-6, rtol=0)  # constant over images too


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match='unknown texture kind'):
        textures.spectrum('plaid', 8)
