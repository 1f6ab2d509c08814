"""timm_joint models as deepinv denoisers (``timm_joint.prior``): the adapter against ``denoise``, deepinv's
own denoiser checks, the explicit potential, and the adapter inside deepinv's PnP / RED solvers."""
import importlib.util
import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_joint
from timm_joint import metrics

dinv = pytest.importorskip('deepinv')
from timm_joint.prior import DeepinvAdapter, GradientStepPrior  # noqa: E402
from timm_joint.protocol import has_energy, is_blind  # noqa: E402


def _images(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope='module')
def joint():
    """The tiny GradResNet, untrained but for a classifier of a sensible scale. At initialisation the
    bias-free network's features phi are small (rms 0.05 on [0, 1] images) and the default init of W
    gives logits of about 0.02, so the class term sigma^2 grad log p(c | y) of D(y, c) is at most 5e-5
    (measured): too small for the checks below to tell a class term from a missing one. W ~ N(0, 1) /
    mean ||phi|| gives logits of unit spread and a class term of about 2e-3."""
    torch.manual_seed(0)
    return _with_unit_logits(timm.create_model('gradresnet_tiny_joint', num_classes=5).eval())


def _with_unit_logits(model):
    """Random classifier weights W ~ N(0, 1) / mean ||phi||: logits of about unit spread."""
    with torch.no_grad():
        x = _images(8, 3, 16, 16, seed=99, dtype=model.fc.weight.dtype)
        phi = model.forward_head(model.forward_features(x), pre_logits=True)
        model.fc.weight.normal_().div_(phi.norm(dim=1).mean())
    return model


@pytest.fixture(scope='module')
def baselines():
    torch.manual_seed(0)
    return {'dncnn': timm.create_model('dncnn_deepinv', depth=3, width=8).eval(),
            'drunet': timm.create_model('drunet_deepinv', width=4, num_blocks=1).eval()}


def _smooth_images(n, size=16, seed=0):
    """Smooth colour images: bicubic upsampling of a coarse random grid (a 4 px correlation length)."""
    z = torch.randn(n, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return (0.5 + 0.15 * F.interpolate(z, size=(size, size), mode='bicubic', align_corners=False)).clamp(0, 1)


@pytest.fixture(scope='module')
def trained():
    """The tiny GradResNet trained for 200 steps to denoise smooth 16 px images (7 s of one CPU thread): a
    denoiser that does something, so that the solvers' PSNR checks can fail.

    The bias-free network starts as nearly the identity (residual rms 0.002) and trains more slowly than
    the earlier one (biases, plain GroupNorm), which 40 steps at lr 3e-3 made a 2.4-6 dB denoiser. With
    this network, measured on held-out images at sigma 0.05 / 0.1 / 0.2: 40 steps at 3e-3, -0.2 / 1.9 /
    3.4 dB; 150 steps at 3e-3, 3.2 / 6.3 / 8.2 dB for seed 0 but nothing learnt for seed 1 (the loss
    oscillated at the noisy input's); 200 steps at 2e-3, 3.1-3.8 / 6.1-6.7 / 8.0-8.3 dB over seeds 0-2."""
    torch.manual_seed(0)
    model = timm.create_model('gradresnet_tiny_joint', num_classes=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(200):
        x = _smooth_images(16, seed=step + 1)
        sigma = 0.3 * torch.rand(16, 1, 1, 1, generator=g)
        loss = F.mse_loss(model.denoise(x + sigma * torch.randn(x.shape, generator=g)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- the adapter is the model's denoiser -----------------------------------------------------------------

@pytest.mark.parametrize('sigma', [25 / 255, torch.tensor(25 / 255), torch.full((3,), 0.1),
                                   torch.full((3, 1, 1, 1), 0.1), torch.tensor([0.05, 0.1, 0.2])])
def test_blind_adapter_equals_denoise(joint, sigma):
    y = _images(3, 3, 13, 11)
    den = DeepinvAdapter(joint)
    expected = joint.denoise(y)
    with torch.no_grad():  # deepinv's solvers call denoisers under no_grad: grad is enabled inside
        out = den(y, sigma)
    assert out.shape == y.shape and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(den(y), expected, rtol=0, atol=1e-6)  # blind: no sigma needed


def test_conditional_adapter_equals_denoise(joint):
    y = _images(3, 3, 13, 11, seed=1)
    c = torch.tensor([0, 3, 4])
    sigma = torch.tensor([0.05, 0.1, 0.2])
    expected = joint.denoise(y, sigma=sigma, c=c)
    den = DeepinvAdapter(joint)
    with torch.no_grad():
        by_keyword = den(y, sigma, class_labels=c)             # deepinv samplers' keyword
        by_c = den(y, sigma.view(3, 1, 1, 1), c=c)             # this package's keyword
        one_hot = den(y, sigma, class_labels=F.one_hot(c, 5).float())
        fixed = DeepinvAdapter(joint, c=c)(y, sigma)          # a class fixed at construction
    for out in (by_keyword, by_c, one_hot, fixed):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # the class term matters: D(y, c) differs from D(y), and between classes
    assert (by_keyword - joint.denoise(y)).abs().max() > 1e-4
    assert (den(y, sigma, c=torch.tensor([1, 1, 1])) - by_keyword).abs().max() > 1e-5


def test_guidance_scales_the_class_term(joint):
    y = _images(2, 3, 16, 16, seed=2)
    c, sigma = torch.tensor([1, 2]), 0.1
    blind, cond = joint.denoise(y), joint.denoise(y, sigma=sigma, c=c)
    torch.testing.assert_close(DeepinvAdapter(joint, guidance=0.)(y, sigma, c=c), blind, rtol=0, atol=1e-6)
    torch.testing.assert_close(DeepinvAdapter(joint, guidance=3.)(y, sigma, c=c), blind + 3 * (cond - blind),
                               rtol=0, atol=1e-5)


def test_baselines(baselines):
    y = _images(2, 3, 16, 16, seed=3)
    dncnn, drunet = DeepinvAdapter(baselines['dncnn']), DeepinvAdapter(baselines['drunet'])
    assert dncnn.blind and not drunet.blind
    with torch.no_grad():
        torch.testing.assert_close(dncnn(y, 0.1), baselines['dncnn'].denoise(y))
        torch.testing.assert_close(dncnn(y, 0.3), dncnn(y, 0.1))  # blind: sigma ignored
        torch.testing.assert_close(drunet(y, 0.1), baselines['drunet'].denoise(y, sigma=0.1))
        assert (drunet(y, 0.3) - drunet(y, 0.1)).abs().max() > 0  # non-blind: sigma used
    with pytest.raises(ValueError, match='non-blind'):
        drunet(y)
    with pytest.raises(ValueError, match='no classifier'):
        dncnn(y, 0.1, class_labels=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match='no explicit potential'):
        GradientStepPrior(baselines['dncnn'])


def test_wrapped_timm_classifier():
    net = timm_joint.JointDensityWrapper(timm.create_model('resnet18', num_classes=3), warn_untrained=False).eval()
    y = _images(2, 3, 32, 32, seed=4)
    den = DeepinvAdapter(net)
    assert is_blind(net) and has_energy(net)
    with torch.no_grad():
        torch.testing.assert_close(den(y, 0.1), net.denoise(y), rtol=0, atol=1e-6)
        torch.testing.assert_close(den(y, 0.1, class_labels=torch.tensor([0, 2])),
                                   net.denoise(y, sigma=0.1, c=torch.tensor([0, 2])), rtol=0, atol=1e-6)


def test_bad_input(joint):
    den = DeepinvAdapter(joint)
    y = _images(2, 3, 16, 16)
    with pytest.raises(TypeError, match='denoise'):
        DeepinvAdapter(timm.create_model('resnet18', num_classes=3))
    with pytest.raises(TypeError, match='denoise'):
        DeepinvAdapter(lambda x: x)
    with pytest.raises(ValueError, match='guidance'):
        DeepinvAdapter(joint, guidance=-1)
    with pytest.raises(ValueError, match=r'sigma must be a float or a tensor of shape'):
        den(y, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match='finite'):
        den(y, -0.1)
    with pytest.raises(TypeError, match='sigma'):
        den(y, 'high')
    with pytest.raises(ValueError, match='needs the noise level'):
        den(y, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='> 0'):
        den(y, 0., class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='out of range'):
        den(y, 0.1, class_labels=torch.tensor([0, 9]))
    with pytest.raises(TypeError, match='integers'):
        den(y, 0.1, class_labels=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r'\[B, 5\]'):
        den(y, 0.1, class_labels=torch.zeros(2, 7))
    with pytest.raises(ValueError, match='no classifier'):
        DeepinvAdapter(timm.create_model('gradresnet_tiny_joint', num_classes=0), c=1)
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\]'):
        den(_images(2, 1, 16, 16), 0.1)


# -- deepinv's own checks of a denoiser -------------------------------------------------------------------

@pytest.fixture(scope='module')
def deepinv_model_tests():
    """deepinv's test module (shipped in its wheel), loaded under a name of its own (ours has a
    test_models.py too) with its folder on the path for its ``dummy`` helper."""
    folder = os.path.join(os.path.dirname(dinv.__file__), 'tests')
    path = os.path.join(folder, 'test_models.py')
    if not os.path.exists(path):
        pytest.skip('deepinv was installed without its tests')
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location('deepinv_test_models', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


@pytest.mark.parametrize('which', ['joint', 'joint_conditional', 'dncnn', 'drunet'])
def test_deepinv_denoiser_checks(deepinv_model_tests, monkeypatch, joint, baselines, which):
    models = {'joint': lambda: DeepinvAdapter(joint), 'joint_conditional': lambda: DeepinvAdapter(joint, c=2),
              'dncnn': lambda: DeepinvAdapter(baselines['dncnn']),
              'drunet': lambda: DeepinvAdapter(baselines['drunet'])}
    monkeypatch.setattr(deepinv_model_tests, 'choose_denoiser', lambda name, imsize: models[which]())
    # deepinv's checks, as its test suite runs them: output shape on an odd size (37x31), a float,
    # a 0-d tensor and a per-image tensor sigma, batch 1 and 2, under no_grad.
    deepinv_model_tests.test_denoiser_color((3, 37, 31), 'cpu', which)
    for batch_size in (1, 2):
        deepinv_model_tests.test_denoiser_sigma_color(batch_size, which, 'cpu')


# -- the explicit potential -------------------------------------------------------------------------------

def test_potential_is_the_denoisers_potential():
    torch.manual_seed(0)
    model = _with_unit_logits(timm.create_model('gradresnet_tiny_joint', num_classes=4).double().eval())
    den = DeepinvAdapter(model)
    y = _images(2, 3, 11, 13, seed=5, dtype=torch.float64)
    c, sigma = torch.tensor([1, 3]), torch.tensor([0.1, 0.2], dtype=torch.float64)
    torch.testing.assert_close(den.potential(y), model.energy(y))
    torch.testing.assert_close(den.neg_log_prob(y, sigma, c=c), -model.log_prob(y, sigma=sigma, c=c))
    for kw in ({}, {'class_labels': c}):
        # D(y) = y - grad g(y): the gradient of the potential, by autograd, is the denoiser's residual
        y_in = y.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(den.potential(y_in, sigma, **kw).sum(), y_in)
        torch.testing.assert_close(grad, den.potential_grad(y, sigma, **kw), rtol=1e-6, atol=1e-9)
    # the guided potential's gradient is the guided denoiser's residual too
    guided = DeepinvAdapter(model, guidance=2.)
    y_in = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(guided.potential(y_in, sigma, c=c).sum(), y_in)
    torch.testing.assert_close(grad, guided.potential_grad(y, sigma, c=c), rtol=1e-6, atol=1e-9)
    prior = GradientStepPrior(model)
    assert prior.explicit_prior
    torch.testing.assert_close(prior(y, 0.1), model.energy(y))
    torch.testing.assert_close(prior.grad(y, 0.1), y - model.denoise(y))


def test_score_prior_is_the_models_score(joint):
    """deepinv's ScorePrior, (D(x) - x) / sigma^2, on the adapter is the model's own score (Tweedie)."""
    y = _images(2, 3, 16, 16, seed=8)
    c = torch.tensor([1, 4])
    prior = dinv.optim.ScorePrior(DeepinvAdapter(joint))
    torch.testing.assert_close(prior.score(y, 0.1), joint.score(y, sigma=0.1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(prior.score(y, 0.1, class_labels=c), joint.score(y, sigma=0.1, c=c),
                               rtol=1e-4, atol=1e-3)


def test_gradient_flows_through_the_adapter(joint):
    """DPS differentiates through the denoiser: with an input that requires grad the output carries the
    graph (double backward), even under no_grad."""
    y = _images(2, 3, 16, 16, seed=6).requires_grad_(True)
    den = DeepinvAdapter(joint)
    out = den(y, 0.1)
    (g,) = torch.autograd.grad(out.pow(2).sum(), y)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # a finite difference along a direction agrees with the gradient (it is D's Jacobian, not the identity)
    v = _images(2, 3, 16, 16, seed=7) - 0.5
    eps = 1e-3
    with torch.no_grad():
        fd = ((den(y + eps * v, 0.1).pow(2).sum() - den(y - eps * v, 0.1).pow(2).sum()) / (2 * eps))
    assert abs(float(fd) - float((g * v).sum())) < 2e-2 * abs(float(fd)) + 1e-3


# -- inside deepinv's solvers ----------------------------------------------------------------------------

def _inpainting_problem(n=4, size=16):
    x = _smooth_images(n, size, seed=100)
    noise = dinv.physics.GaussianNoise(0.01, rng=torch.Generator().manual_seed(0))
    physics = dinv.physics.Inpainting(img_size=(3, size, size), mask=0.5, pixelwise=True, noise_model=noise,
                                      rng=torch.Generator().manual_seed(1))
    y = physics(x)
    mask = physics.mask.expand_as(y)
    x0 = y * mask + (y * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True) * (1 - mask)
    return x, y, x0, physics


@pytest.mark.parametrize('prior', ['pnp', 'red', 'gradient_step'])
def test_inpainting_with_deepinv_solvers(trained, prior):
    x, y, x0, physics = _inpainting_problem()
    den = DeepinvAdapter(trained)
    if prior == 'pnp':
        solver = dinv.optim.optim_builder(
            iteration='HQS', prior=dinv.optim.PnP(denoiser=den), data_fidelity=dinv.optim.data_fidelity.L2(),
            params_algo={'stepsize': [20., 10., 5., 2., 1., 1.], 'g_param': [0.1] * 6}, max_iter=6)
    else:
        p = dinv.optim.RED(denoiser=den) if prior == 'red' else GradientStepPrior(den)
        solver = dinv.optim.optim_builder(
            iteration='PGD', prior=p, data_fidelity=dinv.optim.data_fidelity.L2(), g_first=True,
            params_algo={'stepsize': 1.0, 'lambda': 1.0, 'g_param': 0.05}, max_iter=6)
    x_hat = solver(y, physics, init=x0)
    gain = float(metrics.psnr(x_hat, x).mean() - metrics.psnr(x0, x).mean())
    # measured: PnP 3.6, RED and the gradient step 4.3 dB over the mean-filled measurement (2.8-3.6 and
    # 3.5-4.3 dB over training seeds 0-2); an identity "denoiser" gives about 0
    assert gain > 2.0, gain


def test_explicit_objective_and_backtracking(trained):
    """With GradientStepPrior deepinv evaluates f + lambda E along the iterations (and can backtrack on the
    step size): the objective must not increase."""
    x, y, x0, physics = _inpainting_problem()
    solver = dinv.optim.optim_builder(
        iteration='PGD', prior=GradientStepPrior(trained), data_fidelity=dinv.optim.data_fidelity.L2(),
        g_first=True, params_algo={'stepsize': 1.0, 'lambda': 1.0, 'g_param': 0.05}, max_iter=6,
        backtracking=dinv.optim.BacktrackingConfig(), early_stop=False)
    x_hat, m = solver(y, physics, init=x0, x_gt=x, compute_metrics=True)
    cost = torch.tensor(m['cost'][0])
    assert cost.numel() >= 5 and torch.isfinite(cost).all()
    assert (cost[1:] <= cost[:-1] + 1e-6 * cost.abs().max()).all(), cost


def test_diffusion_solvers_run_through_the_adapter(joint):
    """deepinv's diffusion restorers call the denoiser under no_grad (DiffPIR) or differentiate through it
    (DPS); both run with a gradient denoiser."""
    x = _smooth_images(1, 16, seed=3)
    physics = dinv.physics.Inpainting(img_size=(3, 16, 16), mask=0.5, noise_model=dinv.physics.GaussianNoise(0.02),
                                      rng=torch.Generator().manual_seed(0))
    y = physics(x)
    den = DeepinvAdapter(joint)
    out = dinv.sampling.DiffPIR(den, data_fidelity=dinv.optim.data_fidelity.L2(), max_iter=3, sigma=0.02)(y, physics)
    assert out.shape == x.shape and torch.isfinite(out).all()
    dps = dinv.sampling.DPS(den, num_steps=3, rng=torch.Generator().manual_seed(0))
    out = dps(y, physics, seed=0)
    assert out.shape == x.shape and torch.isfinite(out).all()
