"""JointDensityWrapper around stock timm classifiers: a CNN ([B, C, H, W] features) and a ViT ([B, N, C]).

The wrapper takes [0, 1] pixels and normalises inside; the reference path here normalises by hand
with timm's ImageNet constants, so a wrong mean/std, a double normalisation or a changed head shows.
"""
import warnings

import pytest
import torch
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

from timm_joint import JointDensityWrapper
from timm_joint.losses import JointLoss, JointObjective

from conftest import rand_images


def _resnet18(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('resnet18', num_classes=10, pretrained=False).to(dtype).eval()


def _wrap(model: torch.nn.Module) -> JointDensityWrapper:
    return JointDensityWrapper(model, energy_init_scale=1.0, warn_untrained=False).eval()


def _symmetry_gap(fn, y: torch.Tensor, seed: int = 0):
    """(<u, J v>, <v, J u>) for the Jacobian J of fn at y, each by one backward (J^T w)."""
    u = rand_images(*y.shape, dtype=y.dtype, seed=seed + 1) - 0.5
    v = rand_images(*y.shape, dtype=y.dtype, seed=seed + 2) - 0.5
    y_req = y.clone().requires_grad_(True)
    (jt_u,) = torch.autograd.grad((fn(y_req) * u).sum(), y_req)
    y_req = y.clone().requires_grad_(True)
    (jt_v,) = torch.autograd.grad((fn(y_req) * v).sum(), y_req)
    return (jt_u * v).sum(), (jt_v * u).sum()


def test_logits_equal_the_wrapped_model_on_normalised_input():
    model = _resnet18()
    wrapped = _wrap(model)
    x = rand_images(3, 3, 37, 31, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((x - mean) / std)
        torch.testing.assert_close(wrapped(x), ref, rtol=1e-5, atol=1e-6)
        logits, energy = wrapped.forward_joint(x)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(energy, wrapped.energy(x))
    assert wrapped.num_classes == 10 and wrapped.num_features == model.num_features


def test_reports_raw_pixel_config_without_touching_the_wrapped_one():
    model = _resnet18()
    wrapped = _wrap(model)
    assert wrapped.pretrained_cfg['mean'] == (0., 0., 0.) and wrapped.pretrained_cfg['std'] == (1., 1., 1.)
    data_cfg = resolve_data_config({}, model=wrapped)
    assert tuple(data_cfg['mean']) == (0., 0., 0.) and tuple(data_cfg['std']) == (1., 1., 1.)
    # The wrapped classifier still reports its own statistics (they are applied inside).
    assert tuple(model.pretrained_cfg['mean']) == IMAGENET_DEFAULT_MEAN
    assert set(k.split('.')[0] for k in wrapped.state_dict()) == {'model', 'mean', 'std', 'energy_head'}


def test_warns_that_the_energy_head_is_untrained():
    with pytest.warns(UserWarning, match='untrained'):
        JointDensityWrapper(_resnet18())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        JointDensityWrapper(_resnet18(), warn_untrained=False)


def test_denoise_works_with_and_without_grad():
    wrapped = _wrap(_resnet18())
    y = rand_images(3, 3, 37, 31, dtype=torch.float32)
    d = wrapped.denoise(y)
    assert d.shape == y.shape and d.dtype == y.dtype and not d.requires_grad
    assert (d - y).abs().max() > 1e-6  # the energy gradient is not zero
    with torch.no_grad():
        torch.testing.assert_close(wrapped.denoise(y), d, rtol=0, atol=0)
        dc = wrapped.denoise(y, sigma=0.1, c=torch.tensor([0, 5, 9]))
    assert dc.shape == y.shape
    assert all(p.grad is None for p in wrapped.parameters())


def test_wrapper_identities_in_float64():
    # The mixin's maths holds for a wrapped classifier too: eq. 9 and a symmetric Jacobian of D.
    wrapped = _wrap(_resnet18(torch.float64))
    y = rand_images(2, 3, 33, 29)
    sigma, c = torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([3, 7])
    shift = wrapped.denoise(y, sigma=sigma, c=c) - wrapped.denoise(y)
    torch.testing.assert_close(shift, sigma.view(-1, 1, 1, 1) ** 2 * wrapped.adversarial_gradient(y, c=c),
                               rtol=1e-7, atol=1e-12)
    a, b = _symmetry_gap(wrapped.denoise, y)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_token_model_energy_sums_over_all_tokens():
    # A ViT's forward_features is [B, N, C] with N = 1 class token + 16 patch tokens at 32 px / 8.
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10).double().eval()
    wrapped = _wrap(vit)
    y = rand_images(2, 3, 32, 32)
    tokens = vit.forward_features((y - 0.5) / 0.5)  # the ViT's own mean/std are 0.5
    assert tokens.shape == (2, 17, vit.num_features)
    a = wrapped.energy_head.maps[0].weight[:, :, 0, 0]
    by_hand = 0.5 * (tokens @ a.T).pow(2).sum((1, 2))
    torch.testing.assert_close(wrapped.energy(y), by_hand, rtol=1e-10, atol=0)

    # Every 8x8 patch receives an energy gradient, and D is still a gradient field.
    residual = (wrapped.denoise(y) - y).abs().unfold(2, 8, 8).unfold(3, 8, 8).amax((-1, -2, 1))
    assert residual.shape == (2, 4, 4) and bool((residual > 1e-4).all()), residual.min()
    u_jv, v_ju = _symmetry_gap(wrapped.denoise, y)
    torch.testing.assert_close(u_jv, v_ju, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(wrapped(y), vit((y - 0.5) / 0.5))


def test_token_model_trains_with_the_joint_loss():
    # The denoising loss is a double backward; fused attention has none, so the wrapper unfuses it.
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10, depth=2)
    fused_before = [m.fused_attn for m in vit.modules() if hasattr(m, 'fused_attn')]
    wrapped = _wrap(vit).train()
    assert fused_before and not any(m.fused_attn for m in vit.modules() if hasattr(m, 'fused_attn'))
    x = rand_images(2, 3, 32, 32, dtype=torch.float32)
    out = JointObjective(wrapped)(x + 0.1, x + 0.1)
    JointLoss(lambda_den=1.0)(out, torch.tensor([1, 2]), x)['loss'].backward()
    missing = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_orthogonal_energy_init_is_constant_after_a_layernorm():
    # Why the wrapper's energy head starts 'normal': the ViT's tokens leave a LayerNorm with
    # ||f_n||^2 = C (up to its eps), so an A with A^T A = (s^2 / C) I gives E = 0.5 * s^2 * N for
    # every image and D(y) = y. The 'normal' init of the same scale does not.
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10, depth=1).double().eval()
    y = rand_images(2, 3, 32, 32)
    ortho = JointDensityWrapper(vit, energy_init_scale=1.0, energy_init='orthogonal', warn_untrained=False)
    torch.testing.assert_close(ortho.energy(y), torch.full((2,), 0.5 * 17, dtype=torch.float64), rtol=1e-4, atol=0)
    assert (ortho.denoise(y) - y).abs().max() < 1e-5
    normal = JointDensityWrapper(vit, energy_init_scale=1.0, warn_untrained=False)
    assert (normal.denoise(y) - y).abs().max() > 1e-3
