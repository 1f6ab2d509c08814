"""timm's model checks for every registered GradResNet, the ablation flags, and the autograd contract.

Models are built small (num_classes=3) and run at odd sizes (13x11; 65x63 for the 224 px stem);
the default-config shape check runs on the meta device, so no full-size forward is paid for.
"""
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import timm
from timm.models import FeatureListNet, group_parameters

import timm_joint
from timm_joint.losses import JointLoss, JointObjective
from timm_joint.models.gradresnet import ChannelCentring, GroupNormScale, ScaledAct, ScaleGroupNorm

from conftest import make_small_gradresnet, rand_images

MODEL_NAMES = timm.list_models('gradresnet*')
NUM_CLASSES = 3


def _odd_input(name: str, batch_size: int = 3, dtype=torch.float32) -> torch.Tensor:
    size = (65, 63) if '224' in name else (13, 11)
    return rand_images(batch_size, 3, *size, dtype=dtype, seed=batch_size)


def _grads(model: nn.Module):
    return {n: p.grad for n, p in model.named_parameters()}


def _joint_step(model: nn.Module, y_cls, y_den, x_den, target, lambda_den: float = 1.0):
    """One joint forward + backward (train mode); returns (outputs, loss terms)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = JointObjective(model)(y_cls, y_den)
    terms = JointLoss(lambda_den=lambda_den)(out, target, x_den)
    terms['loss'].backward()
    return out, terms


def test_registry_lists_the_documented_models():
    assert {'gradresnet18_joint', 'gradresnet18_joint_224', 'gradresnet10_joint',
            'gradresnet_tiny_joint'} <= set(MODEL_NAMES)
    assert set(timm.list_models(pretrained=True, filter='gradresnet*')) >= {
        f'{n}.{timm.models.get_pretrained_cfg(n).tag}' for n in MODEL_NAMES}


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_backward_at_odd_sizes(name):
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    for batch_size in (1, 3):
        model.zero_grad(set_to_none=True)
        x = _odd_input(name, batch_size)
        out = model(x)
        assert out.shape == (batch_size, NUM_CLASSES)
        assert torch.isfinite(out).all()
        out.mean().backward()
        # Both heads read the same features: the logits reach every parameter, the side maps included
        # (timm's own backward test asks exactly this).
        no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not no_grad


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_joint_loss_gives_every_parameter_a_grad(name):
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    x = _odd_input(name)
    y = x + 0.1 * torch.randn_like(x)
    _joint_step(model, y, y, x, torch.tensor([0, 1, 2]))
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_default_cfg_agrees_with_model(name):
    model = timm.create_model(name, device='meta')  # shapes only: no compute at the full input size
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state and cfg['classifier'] + '.weight' in state
    assert state[cfg['first_conv'] + '.weight'].shape[1] == cfg['input_size'][0]
    assert state[cfg['classifier'] + '.weight'].shape == (cfg['num_classes'], model.num_features)
    assert cfg['mean'] == (0., 0., 0.) and cfg['std'] == (1., 1., 1.)
    assert cfg['hf_hub_id'].startswith(timm_joint.HF_HUB_ORG + '/')
    assert cfg['license'] and cfg['paper_ids']

    x = torch.empty(2, *cfg['input_size'], device='meta')
    feat = model.forward_features(x)
    assert feat.shape == (2, model.num_features, *cfg['pool_size'])
    assert model.forward_head(feat, pre_logits=True).shape == (2, model.num_features)
    assert model(x).shape == (2, cfg['num_classes'])
    # phi: the final stage's channels and half of every other stage's (the side maps).
    chs = [i['num_chs'] for i in model.feature_info[1:]]
    assert model.num_features == model.head_hidden_size == chs[-1] + sum(c // 2 for c in chs[:-1])
    assert cfg['input_size'][1] // model.feature_info[-1]['reduction'] == cfg['pool_size'][0]


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_reset_classifier(name):
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    x = _odd_input(name, 1)
    feat = model.forward_features(x)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (1, model.num_features)
    model.reset_classifier(0, '')  # no pooling: forward gives the final map
    assert model(x).shape == feat.shape
    model.reset_classifier(7, 'avg')
    assert model(x).shape == (1, 7) and model.get_classifier().out_features == 7
    assert model.get_classifier().bias is None  # bias-free, as built
    biased = timm.create_model(name, num_classes=NUM_CLASSES, bias=True)
    biased.reset_classifier(7)
    assert biased.get_classifier().bias is not None  # and the biased ablation keeps its head's bias


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_device_and_dtype_keywords(name):
    meta = timm.create_model(name, num_classes=NUM_CLASSES, device='meta')
    assert all(p.device.type == 'meta' for p in meta.parameters())
    meta.reset_classifier(5)
    assert meta.get_classifier().weight.device.type == 'meta'

    model = timm.create_model(name, num_classes=NUM_CLASSES, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = _odd_input(name, 1, dtype=torch.float64)
    assert model(x).dtype == torch.float64
    assert model.eval().energy(x).dtype == torch.float64

    with pytest.raises(TypeError):
        timm.create_model(name, num_classes=NUM_CLASSES, not_an_argument=1)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_group_matcher(name):
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert len(groups) > 1
        grouped = [n for names in groups.values() for n in names]
        assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_features_only_and_forward_intermediates(name):
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    x = _odd_input(name, 1)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert len(inter) == len(model.feature_info)
        for t, info in zip(inter, model.feature_info):
            assert t.shape[1] == info['num_chs']
            assert t.shape[2] == -(-x.shape[2] // info['reduction'])
        # timm's hook-free feature wrapper over the same modules: the same tensors.
        feats = FeatureListNet(model, out_indices=tuple(range(len(model.feature_info))),
                               flatten_sequential=True)(x)
        for a, b in zip(feats, inter):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        for a, b in zip(last2, inter[-2:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    fo = timm.create_model(name, features_only=True).eval()
    assert fo.feature_info.channels() == [i['num_chs'] for i in model.feature_info]
    assert [t.shape[1] for t in fo(x)] == fo.feature_info.channels()
    getter = timm.create_model(name, features_only=True, feature_cls='getter', out_indices=(1, 2))
    assert [t.shape[1] for t in getter(x)] == [model.feature_info[i]['num_chs'] for i in (1, 2)]


def test_prune_intermediate_layers_keeps_a_consistent_model():
    model = make_small_gradresnet(layers=(1, 1, 1), channels=(8, 16, 32))  # bias-free, so D(0) = 0
    y = rand_images(1, 3, 13, 11)
    with torch.no_grad():
        inter = model.forward_intermediates(y, intermediates_only=True)
    model.prune_intermediate_layers(indices=[1, 2])
    assert len(model.stages) == 2 and len(model.side) == 1
    assert model.num_features == 16 + 4  # the last kept map and the side map of the stage before it
    out = model(y)  # head pruned: the last kept map and the broadcast side features
    assert out.shape == (1, 20, *inter[2].shape[2:])
    torch.testing.assert_close(out[:, :16], inter[2], rtol=0, atol=0)
    # The energy keeps the side terms of the stages left, and stays a gradient field.
    assert len(model.energy_maps(y)) == 2
    assert torch.equal(model.denoise(torch.zeros_like(y)), torch.zeros_like(y))


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name):
    # Non-reentrant checkpointing must survive the double backward of the denoising loss.
    x = rand_images(2, 3, *((33, 31) if '224' in name else (9, 7)), dtype=torch.float32)
    y = x + 0.1 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    results = []
    for ckpt in (False, True):
        model = timm.create_model(name, num_classes=NUM_CLASSES)
        if results:  # the same weights as the run without checkpointing
            model.load_state_dict(results[0][3])
        model.set_grad_checkpointing(ckpt)
        out, terms = _joint_step(model, y, y, x, target)
        d_eval = model.eval().denoise(y)
        results.append((out, terms, _grads(model), model.state_dict(), d_eval))
    (out0, terms0, g0, _, d0), (out1, terms1, g1, _, d1) = results
    tol = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out1['denoised'], out0['denoised'], **tol)
    torch.testing.assert_close(terms1['loss'], terms0['loss'], **tol)
    torch.testing.assert_close(d1, d0, **tol)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert g0[n] is not None and g0[n].abs().sum() > 0, n
        torch.testing.assert_close(g1[n], g0[n], **tol, msg=n)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_torchscript_and_fx_match_eager(name):
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    x = _odd_input(name, 3)
    with torch.no_grad():
        ref = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, still used
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), ref)
    fx_feats = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    assert [t.shape[1] for t in fx_feats(x)] == [i['num_chs'] for i in model.feature_info]


ABLATIONS = {
    'act_layer': ('relu', lambda m: any(isinstance(a, nn.ReLU) for a in m.modules())
                  and not any(isinstance(a, nn.GELU) for a in m.modules())),
    'norm_layer': ('batchnorm', lambda m: any(isinstance(a, nn.BatchNorm2d) for a in m.modules())
                   and not any(isinstance(a, (ScaleGroupNorm, nn.GroupNorm)) for a in m.modules())),
    'norm_layer=groupnorm': ('groupnorm', lambda m: any(isinstance(a, GroupNormScale) for a in m.modules())
                             and not any(isinstance(a, ScaleGroupNorm) for a in m.modules())),
    'norm_position': ('conv', lambda m: isinstance(m.stages[0][0].norm1, ScaleGroupNorm)
                      and isinstance(m.stem[1], ScaleGroupNorm)),
    'norm_position=end': ('end', lambda m: not m.stages[0][0].norm_after_act
                          and isinstance(m.stages[1][0].downsample, nn.Sequential)
                          and len(m.stages[1][0].downsample) == 1),
    'group_size': (4, lambda m: m.stages[0][0].norm.num_groups == 4),
    'bias': (True, lambda m: all(getattr(mod, 'bias', None) is not None for mod in m.modules()
                                 if isinstance(mod, (nn.Conv2d, nn.Linear, ScaleGroupNorm)))),
    'norm_bias': (True, lambda m: m.stages[0][0].norm.bias is not None and m.stem[0].bias is None),
    'side_connections': (False, lambda m: len(m.side) == 0 and m.num_features == 64),
    'heads': ('separate', lambda m: m.energy_head is not None and len(m.energy_head.maps) == 3
              and m.num_features == 64),
    'energy_form': ('pooled', lambda m: m.energy_form == 'pooled'),
    'act_gain': (10., lambda m: isinstance(m.stages[0][0].act1, ScaledAct) and m.stages[0][0].act1.gain == 10.),
    'stem_centring': (True, lambda m: isinstance(m.stem[1], ChannelCentring)),
}


@pytest.mark.parametrize('flag', sorted(ABLATIONS))
def test_ablation_flags_build_and_run(flag):
    value, changed = ABLATIONS[flag]
    model = timm.create_model('gradresnet_tiny_joint', num_classes=NUM_CLASSES, **{flag.split('=')[0]: value})
    assert changed(model)
    default = timm.create_model('gradresnet_tiny_joint', num_classes=NUM_CLASSES)
    assert not changed(default)  # the check tells the flag's network from the default one
    x = rand_images(3, 3, 13, 11, dtype=torch.float32)
    _, terms = _joint_step(model, x + 0.1, x + 0.1, x, torch.tensor([0, 1, 2]))
    assert torch.isfinite(terms['loss'])
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    model.eval()
    assert model.denoise(x).shape == x.shape and model(x).shape == (3, NUM_CLASSES)


def test_in_chans_keyword():
    model = timm.create_model('gradresnet_tiny_joint', num_classes=NUM_CLASSES, in_chans=1).eval()
    y = rand_images(2, 1, 13, 11, dtype=torch.float32)
    assert model(y).shape == (2, NUM_CLASSES) and model.denoise(y).shape == y.shape


# -- the autograd contract (DESIGN §4) ---------------------------------------------------------

def test_denoising_loss_reaches_the_shared_features_classification_loss_every_parameter():
    model = timm.create_model('gradresnet_tiny_joint', num_classes=NUM_CLASSES, dtype=torch.float64)
    x = rand_images(3, 3, 13, 11)
    y = x + 0.1 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    classifier = {n for n, _ in model.named_parameters() if n.startswith('fc.')}
    assert classifier

    _joint_step(model, None, y, x, None)  # denoising term only: double backward into the weights
    for n, p in model.named_parameters():
        if n in classifier:
            assert p.grad is None, n  # the energy does not involve W
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n

    _joint_step(model, y, None, None, torch.tensor([0, 1, 2]))  # classification term only
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n  # the side maps feed the logits too


@pytest.mark.parametrize('train', [False, True])
def test_denoise_under_no_grad_equals_grad_enabled(small_model, train):
    small_model.train(train)
    y = rand_images(3, 3, 13, 11)
    with torch.no_grad():
        d_ng, dc_ng = small_model.denoise(y), small_model.denoise(y, sigma=0.1, c=1)
        s_ng = small_model.score(y, sigma=0.1)
    d, dc, s = small_model.denoise(y), small_model.denoise(y, sigma=0.1, c=1), small_model.score(y, sigma=0.1)
    torch.testing.assert_close(d_ng, d, rtol=0, atol=0)
    torch.testing.assert_close(dc_ng, dc, rtol=0, atol=0)
    torch.testing.assert_close(s_ng, s, rtol=0, atol=0)
    # Training mode builds the graph (the loss differentiates through D), even under no_grad.
    assert d_ng.requires_grad == train and d.requires_grad == train


def test_eval_denoise_builds_no_graph_and_leaves_grads_none(small_model):
    y = rand_images(3, 3, 13, 11)
    outs = [small_model.denoise(y), small_model.denoise(y, sigma=0.1, c=2),
            small_model.score(y, sigma=0.1, c=2), small_model.adversarial_gradient(y, c=2)]
    assert not any(o.requires_grad for o in outs)
    assert all(p.grad is None for p in small_model.parameters())
    assert not y.requires_grad


@pytest.mark.parametrize('with_class', [False, True])
def test_input_requiring_grad_gets_the_true_input_gradient(small_model, with_class):
    # What an attack or a plug-and-play solver sees: d<v, D(y)>/dy by autograd against a central
    # finite difference of D along v (J^T v == J v, as J is symmetric).
    y = rand_images(1, 3, 9, 7)
    v = rand_images(1, 3, 9, 7, seed=5) - 0.5
    kw = dict(sigma=0.2, c=1) if with_class else {}
    y_req = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((small_model.denoise(y_req, **kw) * v).sum(), y_req)
    h = 1e-5
    fd = (small_model.denoise(y + h * v, **kw) - small_model.denoise(y - h * v, **kw)) / (2 * h)
    assert (g - v).abs().max() > 1e-4  # not the identity: the Hessian term is seen
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in small_model.parameters())


def test_inference_mode_raises_a_clear_error(small_model):
    y = rand_images(1, 3, 13, 11)
    with torch.inference_mode():
        assert small_model.energy(y).shape == (1,)  # no input gradient needed
        for call in (lambda: small_model.denoise(y), lambda: small_model.score(y, sigma=0.1),
                     lambda: small_model.denoise(y, sigma=0.1, c=0),
                     lambda: small_model.adversarial_gradient(y, c=0)):
            with pytest.raises(RuntimeError, match='inference_mode.*no_grad'):
                call()


def test_model_table_counts_params_and_flops():
    # The README table's figures (python -m timm_joint.models) against a count by hand: 2 FLOPs per
    # multiply-add of every conv and linear layer, from the output shapes forward hooks record.
    from timm_joint.models.__main__ import markdown_table, model_rows
    (row,) = model_rows('gradresnet_tiny_joint')
    model = timm.create_model('gradresnet_tiny_joint').eval()
    by_hand = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            by_hand.append(2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        else:
            by_hand.append(2 * out.numel() * m.in_features)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert row['flops_classify'] == sum(by_hand)
    assert row['params'] == sum(p.numel() for p in model.parameters())
    assert row['stem'] == '3x3 s1' and row['input_size'] == (32, 32) and row['tags'] == ['cifar10']
    # Denoising adds the energy head and an input-gradient backward: between 1.5x and 3x a forward.
    assert 1.5 * row['flops_classify'] < row['flops_denoise'] < 3 * row['flops_classify']
    assert '`gradresnet_tiny_joint`' in markdown_table([row])


# -- exports of earlier versions -----------------------------------------------------------------

LEGACY = Path(__file__).parent / 'data' / 'legacy_export'


def test_an_export_of_the_earlier_architecture_loads_and_computes_what_it_did():
    # tests/data/legacy_export was written by the previous version (plain GroupNorm before the GELU,
    # biases, a separate energy head), with what that version computed on fixed inputs. Loaded through
    # timm's local-dir, through hub.load_export and through evaluate.load_model, it must rebuild that
    # network, not the new default, and give the same outputs.
    from safetensors.torch import load_file
    from timm_joint.evaluate import load_model
    from timm_joint.hub import load_export
    expected = load_file(str(LEGACY.parent / 'legacy_export_outputs.safetensors'))
    assert 'heads' not in json.loads((LEGACY / 'config.json').read_text())['model_args']
    by_timm = timm.create_model(f'local-dir:{LEGACY}', pretrained=True).eval()
    by_eval, _ = load_model(f'local-dir:{LEGACY}')
    state_dict, _ = load_export(LEGACY)
    for model in (by_timm, by_eval):
        assert model.heads == 'separate' and isinstance(model.stages[0][0].norm, GroupNormScale)
        y = expected['y']
        torch.testing.assert_close(model(y), expected['logits'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.energy(y), expected['energy'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.denoise(y), expected['denoised'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.denoise(y, sigma=0.1, c=1), expected['denoised_c'], rtol=1e-5, atol=1e-6)
    assert set(state_dict) == set(by_timm.state_dict())


def test_a_new_export_names_its_architecture_and_reloads_exactly(tmp_path):
    # An export records every architecture argument, so it rebuilds the same network whatever the
    # defaults become, and is not mistaken for an earlier version's.
    from timm_joint.hub import save_pretrained
    model = timm.create_model('gradresnet_tiny_joint', num_classes=NUM_CLASSES, energy_form='pooled',
                              group_size=4).eval()
    save_pretrained(model, tmp_path / 'export', model_name='gradresnet_tiny_joint',
                    model_args=dict(model.arch_args, num_classes=NUM_CLASSES))
    args = json.loads((tmp_path / 'export' / 'config.json').read_text())['model_args']
    for key in ('norm_layer', 'group_size', 'norm_position', 'bias', 'heads', 'energy_form', 'side_connections'):
        assert key in args, key
    loaded = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True).eval()
    y = rand_images(2, 3, 13, 11, dtype=torch.float32)
    torch.testing.assert_close(loaded.denoise(y), model.denoise(y), rtol=0, atol=0)
    torch.testing.assert_close(loaded(y), model(y), rtol=0, atol=0)


def test_scaled_activation_narrows_the_bend_and_keeps_the_scale():
    # Path 1: ScaledAct(GELU, g). Path 2: GELU written out at g*x, divided by g. For large |x| both tend to
    # ReLU; near 0 the slope of the scaled one changes g times faster.
    import math
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    act = ScaledAct(nn.GELU(), 10.)
    torch.testing.assert_close(act(x), gelu(10 * x) / 10)
    torch.testing.assert_close(act(x)[x.abs() > 1], torch.relu(x)[x.abs() > 1], atol=1e-12, rtol=0)
    relu = ScaledAct(nn.ReLU(), 10.)
    torch.testing.assert_close(relu(x), torch.relu(x))  # positively homogeneous: unchanged


def test_stem_centring_removes_a_learned_fraction_of_each_channels_mean():
    c = ChannelCentring(4).double()
    x = rand_images(2, 4, 5, 6)
    torch.testing.assert_close(c(x).mean((2, 3)), torch.zeros(2, 4, dtype=torch.float64), atol=1e-15, rtol=0)
    with torch.no_grad():
        c.alpha.copy_(torch.tensor([0., 0.5, 1., 2.]))
    expected = x - torch.tensor([0., 0.5, 1., 2.], dtype=torch.float64).view(1, 4, 1, 1) * x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(c(x), expected)
