"""DESIGN §1 identities, each through two independent code paths, in float64 on a small GradResNet.

Sizes are odd (13x11) and batches 1 and 3, so that a wrong axis, a batch mix-up or a pooled (instead
of summed) energy shows.
"""
import pytest
import torch
import torch.nn.functional as F
import timm

from conftest import make_small_gradresnet, rand_images

H, W = 13, 11
ATOL = 1e-10


def _sigmas(batch_size: int) -> torch.Tensor:
    return torch.tensor([0.05, 0.1, 0.3][:batch_size], dtype=torch.float64)


def test_energy_gradcheck(small_model):
    # Finite differences of E against autograd's grad E (what D is built from).
    y = rand_images(1, 3, H, W).requires_grad_(True)
    assert torch.autograd.gradcheck(small_model.energy, (y,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_denoise_gradcheck(small_model):
    # Finite differences of D against its autograd Jacobian (I - Hessian of E): the double backward
    # that an attack or the training loss takes through denoise.
    y = rand_images(1, 3, 5, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(small_model.denoise, (y,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('name', ['energy_head.maps.0.weight', 'energy_head.maps.1.weight', 'stem.0.weight'])
def test_denoise_weight_gradient_gradcheck(name):
    # Finite differences in one weight against the gradient the training loss takes through D(y):
    # the blind denoiser is built from dE/df = A^T A f (not from E itself), so the weights reach D
    # through autograd's grad_outputs as well as through the backbone.
    from torch.func import functional_call
    model = make_small_gradresnet().train()  # a training model builds the graph of grad E
    y = rand_images(2, 3, 5, 4)

    class Denoise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, y):
            return self.m.denoise(y)

    wrapper = Denoise()
    w0 = dict(model.named_parameters())[name].detach().clone().requires_grad_(True)
    fn = lambda w: functional_call(wrapper, {f'm.{name}': w}, (y,))
    assert torch.autograd.gradcheck(fn, (w0,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_float64_stays_float64(small_model, batch_size):
    y = rand_images(batch_size, 3, H, W)
    outs = [
        small_model.energy(y),
        small_model.log_prob(y, sigma=0.1),
        small_model.log_prob(y, sigma=0.1, c=1),
        small_model.score(y, sigma=0.1, c=1),
        small_model.denoise(y),
        small_model.denoise(y, sigma=0.1, c=1),
        small_model.adversarial_gradient(y, c=1),
    ]
    assert [o.dtype for o in outs] == [torch.float64] * len(outs)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_energy_is_half_sum_of_squares_over_stage_outputs(small_model, batch_size):
    # Path 1: energy(). Path 2: by hand from forward_intermediates (each stage's output) and the 1x1
    # maps' weights: E = 0.5 * sum_s sum_hw ||A_s f_s||^2, summed over positions, never averaged.
    y = rand_images(batch_size, 3, H, W)
    feats = small_model.forward_intermediates(y, indices=[1, 2], intermediates_only=True)
    expected = torch.zeros(batch_size, dtype=torch.float64)
    for f, a in zip(feats, small_model.energy_head.maps):
        z = torch.einsum('oc,bchw->bohw', a.weight[:, :, 0, 0], f)
        expected = expected + 0.5 * (z ** 2).sum((1, 2, 3))
    torch.testing.assert_close(small_model.energy(y), expected, rtol=1e-12, atol=0)
    assert bool((small_model.energy(y) >= 0).all())


def test_energy_nonnegative_on_varied_inputs(small_model):
    g = torch.Generator().manual_seed(3)
    y = torch.cat([
        torch.zeros(1, 3, H, W, dtype=torch.float64),
        rand_images(2, 3, H, W),
        torch.randn(2, 3, H, W, generator=g, dtype=torch.float64) * 5.,  # far outside [0, 1]
    ])
    e = small_model.energy(y)
    assert bool((e >= 0).all()), e


@pytest.mark.parametrize('batch_size', [1, 3])
def test_per_sample_sigma_and_class_equal_a_loop(small_model, batch_size):
    y = rand_images(batch_size, 3, H, W)
    sigma = _sigmas(batch_size)
    c = torch.tensor([4, 0, 2][:batch_size])
    batched = {
        'log_prob': small_model.log_prob(y, sigma=sigma, c=c),
        'log_prob_marginal': small_model.log_prob(y, sigma=sigma),
        'score': small_model.score(y, sigma=sigma, c=c),
        'denoise': small_model.denoise(y, sigma=sigma, c=c),
    }
    for i in range(batch_size):
        yi, si, ci = y[i:i + 1], float(sigma[i]), int(c[i])
        torch.testing.assert_close(batched['log_prob'][i:i + 1], small_model.log_prob(yi, sigma=si, c=ci))
        torch.testing.assert_close(batched['log_prob_marginal'][i:i + 1], small_model.log_prob(yi, sigma=si))
        torch.testing.assert_close(batched['score'][i:i + 1], small_model.score(yi, sigma=si, c=ci))
        torch.testing.assert_close(batched['denoise'][i:i + 1], small_model.denoise(yi, sigma=si, c=ci))


@pytest.mark.parametrize('batch_size', [1, 3])
def test_blind_denoiser_does_not_depend_on_sigma(small_model, batch_size):
    # D(y) through denoise(y) against y + sigma^2 * score(y; sigma), at three sigmas: sigma cancels.
    y = rand_images(batch_size, 3, H, W)
    d_blind = small_model.denoise(y)
    assert (d_blind - y).abs().max() > 1e-3  # the energy gradient is not negligible
    for sigma in (0.02, 0.1, 0.5):
        d_from_score = y + sigma ** 2 * small_model.score(y, sigma=sigma)
        torch.testing.assert_close(d_from_score, d_blind, rtol=0, atol=ATOL)
        torch.testing.assert_close(small_model.denoise(y, sigma=sigma), d_blind, rtol=0, atol=0)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_conditional_shift_scales_with_sigma_squared(small_model, batch_size):
    # D(y, c; 2 sigma) - D(y) == 4 (D(y, c; sigma) - D(y)).
    y = rand_images(batch_size, 3, H, W)
    sigma, c = _sigmas(batch_size), torch.tensor([1, 3, 0][:batch_size])
    d = small_model.denoise(y)
    shift_1 = small_model.denoise(y, sigma=sigma, c=c) - d
    shift_2 = small_model.denoise(y, sigma=2 * sigma, c=c) - d
    assert shift_1.abs().max() > 1e-6
    torch.testing.assert_close(shift_2, 4 * shift_1, rtol=1e-7, atol=ATOL)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_eq9_adversarial_gradient_is_scaled_difference_of_denoisers(small_model, batch_size):
    # Path 1: D(y, c) from log_prob (one autograd call of the joint density) minus the blind D(y).
    # Path 2: grad_y log softmax(logits)_c, from adversarial_gradient and from the logits by hand.
    y = rand_images(batch_size, 3, H, W)
    sigma, c = _sigmas(batch_size), torch.tensor([2, 4, 1][:batch_size])
    lhs = small_model.denoise(y, sigma=sigma, c=c) - small_model.denoise(y)
    adv = small_model.adversarial_gradient(y, c=c)
    torch.testing.assert_close(lhs, sigma.view(-1, 1, 1, 1) ** 2 * adv, rtol=1e-7, atol=ATOL)

    y_leaf = y.clone().requires_grad_(True)
    log_p_c = F.log_softmax(small_model(y_leaf), dim=-1).gather(1, c[:, None]).sum()
    (by_hand,) = torch.autograd.grad(log_p_c, y_leaf)
    torch.testing.assert_close(adv, by_hand, rtol=1e-9, atol=ATOL)
    assert by_hand.abs().max() > 1e-6


@pytest.mark.parametrize('with_class', [False, True])
def test_score_is_denoiser_residual_over_sigma_squared(small_model, with_class):
    y = rand_images(3, 3, H, W)
    sigma = _sigmas(3)
    c = torch.tensor([0, 1, 2]) if with_class else None
    d = small_model.denoise(y, sigma=sigma, c=c) if with_class else small_model.denoise(y)
    s = small_model.score(y, sigma=sigma, c=c)
    torch.testing.assert_close(s, (d - y) / sigma.view(-1, 1, 1, 1) ** 2, rtol=1e-7, atol=1e-8)


def test_log_prob_marginal_is_minus_energy_over_sigma_squared(small_model):
    y = rand_images(3, 3, H, W)
    sigma = _sigmas(3)
    torch.testing.assert_close(small_model.log_prob(y, sigma=sigma), -small_model.energy(y) / sigma ** 2)
    # The joint adds log p(c | y) computed from the classifier's logits.
    c = torch.tensor([1, 1, 4])
    log_p_c = F.log_softmax(small_model(y), dim=-1).gather(1, c[:, None])[:, 0]
    torch.testing.assert_close(small_model.log_prob(y, sigma=sigma, c=c),
                               -small_model.energy(y) / sigma ** 2 + log_p_c)


@pytest.mark.parametrize('with_class', [False, True])
def test_denoiser_jacobian_is_symmetric(small_model, with_class):
    # D is y plus a gradient field, so its Jacobian (I minus a Hessian) is symmetric.
    y = rand_images(1, 3, 5, 4)
    if with_class:
        fn = lambda t: small_model.denoise(t, sigma=0.2, c=3)  # noqa: E731
    else:
        fn = small_model.denoise
    jac = torch.autograd.functional.jacobian(fn, y).reshape(y.numel(), y.numel())
    eye = torch.eye(y.numel(), dtype=jac.dtype)
    assert (jac - eye).abs().max() > 1e-4  # not trivially the identity
    torch.testing.assert_close(jac, jac.T, rtol=0, atol=1e-10)


def test_a_non_gradient_field_fails_the_symmetry_check():
    # The symmetry test can fail: a linear map with a non-symmetric matrix is not a gradient field.
    torch.manual_seed(0)
    mat = torch.randn(6, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: t @ mat.T, torch.randn(6, dtype=torch.float64))
    assert not torch.allclose(jac, jac.T, atol=1e-6)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_denoiser_of_zero_is_zero_without_biases(batch_size):
    zero = torch.zeros(batch_size, 3, H, W, dtype=torch.float64)
    model = make_small_gradresnet(bias=False)
    assert torch.equal(model.denoise(zero), zero)
    # The default network, with biases, breaks it, which shows the check can fail.
    biased = make_small_gradresnet()
    with torch.no_grad():  # default bias inits can be tiny: make them plainly nonzero
        for name, p in biased.named_parameters():
            if name.endswith('bias'):
                p.uniform_(0.1, 0.5)
    assert biased.denoise(zero).abs().max() > 1e-6


def test_energy_is_summed_not_averaged_over_positions():
    # A 64 px image tiled from a 32 px one has (up to borders) the 32 px features four times over: a
    # summed energy is ~4x larger and its per-pixel gradient keeps its scale; an energy averaged over
    # positions would keep E and divide the per-pixel gradient by 4.
    model = timm.create_model('gradresnet_tiny_joint', num_classes=4, energy_init_scale=1.0).double().eval()
    x32 = rand_images(2, 3, 32, 32, seed=1)
    x64 = x32.repeat(1, 1, 2, 2)
    energy_ratio = model.energy(x64) / model.energy(x32)
    grad_ratio = ((x64 - model.denoise(x64)).abs().mean((1, 2, 3))
                  / (x32 - model.denoise(x32)).abs().mean((1, 2, 3)))
    assert bool(((energy_ratio > 3.6) & (energy_ratio < 4.4)).all()), energy_ratio
    assert bool(((grad_ratio > 0.8) & (grad_ratio < 1.25)).all()), grad_ratio


def test_autocast_energy_in_float32():
    model = make_small_gradresnet(dtype=torch.float32)
    y = rand_images(3, 3, H, W, dtype=torch.float32)
    ref = model.energy(y)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        e = model.energy(y)
        d = model.denoise(y)
    assert e.dtype == torch.float32 and d.dtype == torch.float32
    torch.testing.assert_close(e, ref, rtol=0.1, atol=0)


def test_channels_last_gives_the_same_results(small_model):
    y = rand_images(3, 3, H, W)
    ref_d, ref_dc = small_model.denoise(y), small_model.denoise(y, sigma=0.1, c=2)
    model_cl = make_small_gradresnet().to(memory_format=torch.channels_last)
    y_cl = y.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl.denoise(y_cl), ref_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model_cl.denoise(y_cl, sigma=0.1, c=2), ref_dc, rtol=1e-10, atol=1e-12)
