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


@pytest.mark.parametrize('name', ['side.0.weight', 'stages.1.0.norm.weight', 'stem.0.weight'])
def test_denoise_weight_gradient_gradcheck(name):
    # Finite differences in one weight against the gradient the training loss takes through D(y):
    # the blind denoiser is built from dE/dg_s in closed form (not from E itself), so the weights reach
    # D through autograd's grad_outputs as well as through the backbone.
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


def _energy_by_hand(model, y, form):
    # E from the stage outputs (forward_intermediates) and the side maps' weights, written out:
    # 0.5 * scale * (sum over positions, or N_s times the pooled mean) of ||g_s||^2.
    feats = model.forward_intermediates(y, indices=list(range(1, len(model.stages) + 1)), intermediates_only=True)
    maps = [feats[-1]] + [torch.einsum('oc,bchw->bohw', a.weight[:, :, 0, 0], f) for f, a in zip(feats, model.side)]
    energy = torch.zeros(y.shape[0], dtype=y.dtype)
    for g in maps:
        if form == 'positions':
            energy = energy + 0.5 * model.energy_scale * (g ** 2).sum((1, 2, 3))
        else:
            n = g.shape[-2] * g.shape[-1]
            energy = energy + 0.5 * model.energy_scale * n * (g.mean((2, 3)) ** 2).sum(1)
    return energy


@pytest.mark.parametrize('form', ['positions', 'pooled'])
@pytest.mark.parametrize('batch_size', [1, 3])
def test_energy_is_half_sum_of_squares_of_the_shared_maps(batch_size, form):
    # Path 1: energy(). Path 2: by hand from each stage's output and the side maps A_s.
    model = make_small_gradresnet(energy_form=form)
    model.energy_scale = 0.37  # any constant: it must multiply E, not change its form
    y = rand_images(batch_size, 3, H, W)
    torch.testing.assert_close(model.energy(y), _energy_by_hand(model, y, form), rtol=1e-12, atol=0)
    assert bool((model.energy(y) >= 0).all())


def test_default_energy_scale_is_the_mean_over_features():
    # The authors' E = 0.5 * mean of phi's squares: 1 / d with d the dimension of phi (pre_logits).
    model = timm.create_model('gradresnet_tiny_joint', num_classes=3)
    phi = model.forward_head(model.forward_features(torch.rand(1, 3, 8, 8)), pre_logits=True)
    assert model.energy_scale == 1. / phi.shape[1] == 1. / model.num_features


def test_separate_heads_energy_is_half_sum_of_squares_over_stage_outputs():
    # The earlier architecture (heads='separate'): E = 0.5 * sum_s sum_hw ||A_s f_s||^2 with its own
    # C x C maps A_s on every stage's output.
    model = make_small_gradresnet(heads='separate')
    y = rand_images(3, 3, H, W)
    feats = model.forward_intermediates(y, indices=[1, 2], intermediates_only=True)
    expected = torch.zeros(3, dtype=torch.float64)
    for f, a in zip(feats, model.energy_head.maps):
        z = torch.einsum('oc,bchw->bohw', a.weight[:, :, 0, 0], f)
        expected = expected + 0.5 * (z ** 2).sum((1, 2, 3))
    torch.testing.assert_close(model.energy(y), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_classifier_reads_the_pooled_final_and_side_maps(small_model, batch_size):
    # phi by hand: the pooled final map, then A_s applied to each pooled stage output; the logits are
    # W phi. forward() and forward_joint() (the path log_prob takes) agree, for sizes that do not divide.
    y = rand_images(batch_size, 3, H, W)
    feats = small_model.forward_intermediates(y, indices=[1, 2], intermediates_only=True)
    phi = torch.cat([feats[-1].mean((2, 3))] + [f.mean((2, 3)) @ a.weight[:, :, 0, 0].T
                                               for f, a in zip(feats, small_model.side)], 1)
    got = small_model.forward_head(small_model.forward_features(y), pre_logits=True)
    torch.testing.assert_close(got, phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(small_model(y), phi @ small_model.fc.weight.T, rtol=1e-10, atol=1e-12)
    logits, _ = small_model.forward_joint(y)
    torch.testing.assert_close(logits, small_model(y), rtol=1e-10, atol=1e-12)


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
    model = make_small_gradresnet()  # the default is bias-free
    assert not any(n.endswith('bias') for n, _ in model.named_parameters())
    assert torch.equal(model.denoise(zero), zero)
    # With biases it breaks, which shows the check can fail.
    biased = make_small_gradresnet(bias=True)
    with torch.no_grad():  # default bias inits can be tiny: make them plainly nonzero
        for name, p in biased.named_parameters():
            if name.endswith('bias'):
                p.uniform_(0.1, 0.5)
    assert biased.denoise(zero).abs().max() > 1e-6


def _homogeneous_model(**kwargs):
    # ReLU, no biases, and a norm epsilon far below the features' variance: positively homogeneous.
    from functools import partial
    from timm_joint.models.gradresnet import ScaleGroupNorm
    return make_small_gradresnet(act_layer='relu', norm_layer=partial(ScaleGroupNorm, group_size=4, eps=1e-14),
                                 **kwargs)


@pytest.mark.parametrize('kwargs', [dict(energy_form='positions'), dict(energy_form='pooled'),
                                    dict(stem_centring=True, act_gain=10.)], ids=['positions', 'pooled', 'levers'])
@pytest.mark.parametrize('a', [0.3, 2., 7.5])
def test_bias_free_relu_network_is_positively_homogeneous(a, kwargs):
    # Path 1: the model at the scaled image a*y. Path 2: the outputs at y, scaled: E(a y) = a^2 E(y),
    # D(a y) = a D(y), logits(a y) = a logits(y) (the property that lets a bias-free denoiser work
    # at noise levels it was not trained on). The stem's centring is linear, and a gain leaves ReLU as is.
    model = _homogeneous_model(**kwargs)
    y = rand_images(3, 3, H, W) + 0.2 * torch.randn(3, 3, H, W, dtype=torch.float64,
                                                      generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model.energy(a * y), a ** 2 * model.energy(y), rtol=1e-9, atol=0)
    torch.testing.assert_close(model.denoise(a * y), a * model.denoise(y), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model(a * y), a * model(y), rtol=1e-9, atol=1e-12)
    assert (model.denoise(y) - y).abs().max() > 1e-3  # the denoiser is not the identity


@pytest.mark.parametrize('kwargs', [dict(bias=True), dict(norm_layer='groupnorm', act_layer='relu'),
                                    dict(norm_layer='scalegroupnorm', act_layer='gelu')],
                         ids=['biases', 'plain-groupnorm', 'gelu'])
def test_homogeneity_fails_with_biases_a_scale_free_norm_or_gelu(kwargs):
    # The check above can fail: biases, a norm that divides the scale away, or GELU break homogeneity.
    if 'norm_layer' in kwargs:
        model = make_small_gradresnet(**kwargs)
    else:
        model = _homogeneous_model(**kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith('bias'):
                    p.uniform_(0.1, 0.5)
    y = rand_images(3, 3, H, W)
    ratio = model.energy(2 * y) / model.energy(y)
    assert not torch.allclose(ratio, torch.full_like(ratio, 4.), rtol=1e-3), ratio


def test_energy_grows_with_the_image_scale():
    # GELU is not homogeneous, but the default network keeps the image's scale: E(2y) > 3 E(y)
    # (a plain GroupNorm divides it away: E(2y) / E(y) was 1.003 for gradresnet18_joint).
    y = rand_images(2, 3, 32, 32, dtype=torch.float32, seed=2)
    for name in ('gradresnet_tiny_joint', 'gradresnet18_joint'):
        model = timm.create_model(name, num_classes=3).eval()
        assert bool((model.energy(2 * y) > 3 * model.energy(y)).all()), name
        plain = timm.create_model(name, num_classes=3, norm_layer='groupnorm').eval()
        ratio = plain.energy(2 * y) / plain.energy(y)
        assert bool((ratio < 1.5).all()), (name, ratio)


@pytest.mark.parametrize('form', ['positions', 'pooled'])
def test_denoiser_gain_does_not_depend_on_the_image_size(form):
    # A 64 px image tiled from a 32 px one has (up to borders) the 32 px features four times over: a
    # size-consistent energy is ~4x larger and its per-pixel gradient keeps its scale; an energy
    # averaged over positions would keep E and divide the per-pixel gradient by 4.
    model = timm.create_model('gradresnet_tiny_joint', num_classes=4, energy_form=form).double().eval()
    x32 = rand_images(2, 3, 32, 32, seed=1)
    x64 = x32.repeat(1, 1, 2, 2)
    energy_ratio = model.energy(x64) / model.energy(x32)
    grad_ratio = ((x64 - model.denoise(x64)).abs().mean((1, 2, 3))
                  / (x32 - model.denoise(x32)).abs().mean((1, 2, 3)))
    assert bool(((energy_ratio > 3.6) & (energy_ratio < 4.4)).all()), energy_ratio
    assert bool(((grad_ratio > 0.9) & (grad_ratio < 1.1)).all()), grad_ratio


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


@pytest.mark.parametrize('form', ['positions', 'pooled'])
@pytest.mark.parametrize('shape', [(2, 3, 4, 5), (2, 3, 7)])
def test_closed_form_energy_map_grads_equal_autograd(form, shape):
    # energy_map_grads (used by the training objective's input gradient) against autograd of energy_of_maps,
    # for image maps and for flattened [B, C, N] maps.
    from timm_joint.joint import energy_map_grads, energy_of_maps
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    h = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads = torch.autograd.grad(energy_of_maps([g, h], form, scale=0.3).sum(), [g, h])
    for auto, closed in zip(grads, energy_map_grads([g.detach(), h.detach()], form, scale=0.3)):
        torch.testing.assert_close(closed, auto)
