"""``python -m timm_joint.evaluate`` end to end on a tiny model and tiny data, its schema, its bad inputs,
and the Jacobian eigen-routine on maps with known spectra."""
import copy
import json
import math
import shutil

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import timm_joint  # noqa: F401  (registers the models)
from timm_joint.data import prepare_quickstart
from timm_joint.evaluate import (
    jacobian_eigs, jacobian_operator, load_model, main, read_training_sigma_max, render_markdown, run, validate_results,
)
from timm_joint.hub import save_pretrained

FIGURES = ('denoising_grid.png', 'psnr_vs_sigma.png', 'robustness.png', 'reliability.png',
           'jacobian_eigenvectors.png')


def _fit_linear_probe(model, data_dir):
    """Ridge-regress the classifier on frozen features (one forward pass), so that the tiny model
    classifies better than chance and its accuracy moves with the noise: the checks below can fail."""
    from timm_joint.data import create_eval_dataset
    ds = create_eval_dataset('', data_dir, img_size=16, split='train')
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    c = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        phi = model.forward_head(model.forward_features(x), pre_logits=True).double()
        scale = phi.norm(dim=1).mean()
        phi = phi / scale  # the bias-free head: no centring, the least-squares fit takes the offset
        targets = torch.nn.functional.one_hot(c, 10).double() - 0.1
        w = torch.linalg.solve(phi.T @ phi + 1e-3 * torch.eye(phi.shape[1], dtype=torch.float64), phi.T @ targets).T
        model.fc.weight.copy_(w / scale * 10)


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    qs = prepare_quickstart(root / 'qs', train_per_class=8, val_per_class=2)
    val_files = sorted((qs / 'validation').rglob('*.png'))
    flat = root / 'flat' / 'validation'  # images without class folders: no labels, 32 px
    small = root / 'ood16' / 'validation' / 'all'  # a 16 px out-of-distribution folder
    flat.mkdir(parents=True)
    small.mkdir(parents=True)
    for i, f in enumerate(val_files[::5]):
        shutil.copy(f, flat / f'{i}.png')
        img = np.asarray(Image.open(f).convert('RGB'))
        Image.fromarray(np.ascontiguousarray(255 - img[::2, ::2])).save(small / f'{i}.png')  # inverted: OOD

    torch.manual_seed(0)
    tiny = timm.create_model('gradresnet_tiny_joint', num_classes=10).eval()
    _fit_linear_probe(tiny, str(qs))
    run_dir = root / 'runs' / 'tiny'
    save_pretrained(tiny, run_dir / 'export', model_name='gradresnet_tiny_joint', model_args={'num_classes': 10})
    # train_joint.py writes its arguments to runs/NAME/args.yaml (0-255 units, as on its command line).
    (run_dir / 'args.yaml').write_text(yaml.safe_dump({'sigma_max_cls': 50, 'sigma_max_den': 90}))
    ref = timm.create_model('test_resnet', num_classes=10)
    save_pretrained(ref, root / 'ref' / 'export', model_name='test_resnet', model_args={'num_classes': 10})
    other = timm.create_model('gradresnet10_joint', num_classes=10)
    save_pretrained(other, root / 'other' / 'export', model_name='gradresnet10_joint', model_args={'num_classes': 10})
    five = timm.create_model('gradresnet_tiny_joint', num_classes=5)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, str(root / 'five.safetensors'))
    return {
        'root': root, 'qs': str(qs), 'flat': str(root / 'flat'), 'ood16': str(root / 'ood16'),
        'tiny': str(run_dir / 'export'), 'ref': str(root / 'ref' / 'export'),
        'other': str(root / 'other' / 'export'), 'five': str(root / 'five.safetensors'),
        'tiny_params': sum(p.numel() for p in tiny.parameters()),
    }


def _common(assets, out, *extra):
    return ['--data-dir', assets['qs'], '--img-size', '16', '--workers', '0', '--batch-size', '8',
            '--no-progress', '--out', str(out), *extra]


@pytest.fixture(scope='module')
def e2e(assets):
    out = assets['root'] / 'out_e2e'
    argv = ['--model', 'gradresnet_tiny_joint', '--checkpoint', assets['tiny'],
            *_common(assets, out, '--max-images', '10', '--sigmas', '0', '25', '--psnr-sigmas', '25', '50',
                     '--attack', 'linf', 'l2', '--attack-images', '10', '--attack-steps', '2',
                     '--attack-sigmas', '0', '25', '--linf-epsilons', '0', '--l2-epsilons', '0',
                     '--reference-model', 'test_resnet', '--reference-checkpoint', assets['ref'],
                     '--ood-data-dir', assets['ood16'], '--eigen-k', '2')]
    returned = run(argv)
    return {'out': out, 'argv': argv, 'returned': returned,
            'results': json.loads((out / 'results.json').read_text())}


def test_cli_writes_valid_results(e2e, assets):
    r = e2e['results']
    validate_results(r)
    assert r == json.loads(json.dumps(e2e['returned']))
    assert r['model']['num_params'] == assets['tiny_params']
    assert r['dataset']['num_images'] == 10 and r['dataset']['img_size'] == 16
    assert set(r['accuracy']) == {'0', '25'}
    assert set(r['psnr']['blind']) == {'25', '50'}
    assert all(isinstance(r['psnr'][k]['25'], float) for k in ('blind', 'cond_true', 'cond_pred'))
    assert set(r['ood']['auroc']) == {'neg_energy', 'max_softmax'}
    assert r['eigen']['top'][0] >= r['eigen']['top'][1] and r['eigen']['bottom'][0] <= r['eigen']['bottom'][1]
    # The training range is read from runs/NAME/args.yaml beside the export.
    assert r['training']['sigma_max_255'] == 90


def test_cli_noisy_psnr_is_the_noise_level(e2e):
    # y = x + sigma * eps unclamped: the input's MSE is sigma^2 on average, so PSNR ~ 20 log10(255 / sigma).
    for k in ('25', '50'):
        assert e2e['results']['noisy_psnr'][k] == pytest.approx(20 * math.log10(255 / float(k)), abs=0.3)


def test_cli_attack_at_epsilon_zero_equals_accuracy_table(e2e):
    # Two code paths: the foolbox grid (epsilon 0) and the evaluation loop, on the same images and noise.
    r = e2e['results']
    assert r['accuracy']['0'] != r['accuracy']['25'], 'the noise must change predictions for this check to bite'
    grid = r['robustness']['accuracy']['gradresnet_tiny_joint']
    for attack in ('linf', 'l2'):
        for sigma in ('0', '25'):
            assert grid[attack][sigma]['0'] == pytest.approx(r['accuracy'][sigma])
    assert set(grid['linf']['0']) == {'0', '8'} and set(grid['l2']['0']) == {'0', '0.5'}  # RobustBench added
    assert 'test_resnet' in r['robustness']['accuracy']


def test_cli_figures_and_markdown(e2e):
    out = e2e['out']
    assert sorted(e2e['results']['figures']) == sorted(f'figures/{f}' for f in FIGURES)
    for name in FIGURES:
        path = out / 'figures' / name
        with Image.open(path) as im:
            assert im.format == 'PNG' and im.width > 50 and im.height > 50
            arr = np.asarray(im.convert('L'))
        assert arr.std() > 1.0, f'{name} is blank'
    md = (out / 'results.md').read_text()
    assert md == render_markdown(e2e['results'])  # rendered from the JSON alone
    assert f"{e2e['results']['accuracy']['25']:.2f}" in md


def test_cli_refuses_to_overwrite(e2e):
    before = (e2e['out'] / 'results.json').read_bytes()
    with pytest.raises(FileExistsError, match='overwrite'):
        run(e2e['argv'])
    assert (e2e['out'] / 'results.json').read_bytes() == before


@pytest.mark.parametrize('mutate, match', [
    (lambda d: d.pop('accuracy'), 'accuracy'),
    (lambda d: d.__setitem__('schema_version', 2), 'schema_version'),
    (lambda d: d['accuracy'].__setitem__('25.0', 50.0), '25.0'),
    (lambda d: d['accuracy'].__setitem__('25', 120.0), 'accuracy'),
    (lambda d: d['psnr'].pop('blind'), 'psnr.blind'),
    (lambda d: d['psnr']['blind'].__setitem__('25', 'high'), 'psnr.blind'),
    (lambda d: d['model'].pop('num_params'), 'num_params'),
    (lambda d: d['dataset'].__setitem__('num_images', 0), 'num_images'),
    (lambda d: d['ood']['auroc'].__setitem__('neg_energy', 1.5), 'auroc'),
    (lambda d: d['robustness']['accuracy']['test_resnet'].__setitem__('l1', {}), 'attack'),
])
def test_validate_results_rejects_broken(e2e, mutate, match):
    d = copy.deepcopy(e2e['results'])
    mutate(d)
    with pytest.raises(ValueError, match=match):
        validate_results(d)


@pytest.mark.parametrize('flag', ['--dataset', '--ood-dataset'])
def test_streams_are_refused_with_what_evaluate_takes(flag, assets, tmp_path):
    argv = ['--model', 'gradresnet_tiny_joint', '--checkpoint', assets['tiny'],
            *_common(assets, tmp_path / 'o', flag, 'wds/')]
    with pytest.raises(ValueError, match='is a stream'):
        run(argv)
    assert not (tmp_path / 'o').exists()


def test_denoising_only_without_labels(assets, tmp_path):
    argv = ['--model', 'gradresnet_tiny_joint', '--checkpoint', assets['tiny'],
            *_common(assets, tmp_path / 'o', '--max-images', '4', '--psnr-sigmas', '25', '--eigen-k', '0')]
    argv[argv.index('--data-dir') + 1] = assets['flat']
    with pytest.raises(ValueError, match='no class labels'):
        run(argv)
    assert not (tmp_path / 'o').exists()
    r = run(argv + ['--sigmas'])
    validate_results(r)
    assert r['accuracy'] == {} and r['psnr']['cond_true']['25'] == 'n/a'
    assert isinstance(r['psnr']['blind']['25'], float) and isinstance(r['psnr']['cond_pred']['25'], float)


def test_plain_timm_classifier_has_no_denoising_metrics(assets, tmp_path):
    r = run(['--model', 'test_resnet', '--checkpoint', assets['ref'],
             *_common(assets, tmp_path / 'o', '--max-images', '4', '--sigmas', '0', '--psnr-sigmas', '25')])
    validate_results(r)
    assert r['psnr']['blind']['25'] == 'n/a' and r['cond_gain_db']['true']['25'] == 'n/a'
    assert 'eigen' not in r and isinstance(r['accuracy']['0'], float)


@pytest.mark.parametrize('case, match', [
    ('other_arch', 'does not fit'),
    ('wrong_classes', 'shape mismatches'),
    ('negative_sigma', '--sigmas'),
    ('negative_epsilon', '--linf-epsilons'),
    ('ood_size', 'OOD dataset has 32x32 images'),
])
def test_bad_input_fails_before_work(assets, tmp_path, case, match):
    out = tmp_path / 'o'
    model = ['--model', 'gradresnet_tiny_joint', '--checkpoint', assets['tiny']]
    extra = []
    if case == 'other_arch':
        model[-1] = assets['other']
    elif case == 'wrong_classes':
        model[-1] = assets['five']
        extra = ['--num-classes', '10']
    elif case == 'negative_sigma':
        extra = ['--sigmas', '0', '-5']
    elif case == 'negative_epsilon':
        extra = ['--attack', 'linf', '--linf-epsilons', '-8']
    elif case == 'ood_size':
        extra = ['--ood-data-dir', assets['flat']]
    with pytest.raises(ValueError, match=match):
        run(model + _common(assets, out, *extra))
    assert not out.exists()


def test_main_exits_with_a_message(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(['--model', 'gradresnet_tiny_joint', '--checkpoint', assets['other'],
              *_common(assets, tmp_path / 'o')])
    assert exc.value.code == 2
    assert 'does not fit' in capsys.readouterr().err


def test_read_training_sigma_max(tmp_path):
    best = tmp_path / 'a' / 'export' / 'best'
    best.mkdir(parents=True)
    (tmp_path / 'a' / 'args.yaml').write_text('sigma_max_den: 80\n')
    assert read_training_sigma_max(str(best))['sigma_max_255'] == 80  # runs/NAME/args.yaml
    # The export's own record (train_joint.py's config.json entry) comes first.
    (best / 'config.json').write_text(json.dumps({'timm_joint': {'sigma_max_den_255': 100, 'sigma_max_cls_255': 50}}))
    assert read_training_sigma_max(str(best))['sigma_max_255'] == 100
    (tmp_path / 'b' / 'export').mkdir(parents=True)
    assert read_training_sigma_max(str(tmp_path / 'b' / 'export'))['sigma_max_255'] is None
    assert read_training_sigma_max(str(tmp_path / 'b' / 'export'), 75.)['sigma_max_255'] == 75.


def test_plain_classifier_normalisation_follows_where_weights_come_from(tmp_path):
    # Registry-style weights expect the config's mean/std; train_joint.py exports were trained on raw pixels.
    torch.manual_seed(0)
    net = timm.create_model('test_resnet', num_classes=3).eval()
    save_pretrained(net, tmp_path / 'foreign', model_name='test_resnet', model_args={'num_classes': 3})
    save_pretrained(net, tmp_path / 'ours', model_name='test_resnet', model_args={'num_classes': 3},
                    extra_config={'timm_joint': {'task': 'classification'}})
    x = torch.rand(2, 3, 16, 16)
    foreign, _ = load_model('test_resnet', str(tmp_path / 'foreign'))
    ours, _ = load_model('test_resnet', str(tmp_path / 'ours'))
    with torch.no_grad():
        assert torch.allclose(foreign(x), net((x - 0.5) / 0.5), atol=1e-5)
        assert torch.allclose(ours(x), net(x), atol=1e-5)


def test_eigs_recover_known_spectrum_of_quadratic_energy():
    # E(y) = 0.5 y^T A y: D(y) = y - A y, so J = I - A with eigenvalues 1 - eig(A), through the same routine.
    g = torch.Generator().manual_seed(0)
    shape = (1, 2, 3, 5)
    n = 30
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-0.5, 1.5, n, dtype=torch.float64) ** 3  # distinct, both signs
    a = q @ torch.diag(lam) @ q.T

    def energy(y):
        v = y.flatten(1)
        return 0.5 * ((v @ a) * v).sum(1)

    y = torch.rand(shape, generator=g, dtype=torch.float64)
    out = jacobian_eigs(energy, y, k=3, tol=1e-10)
    ref_vals, ref_vecs = np.linalg.eigh(np.eye(n) - a.numpy())
    assert out['top_values'].numpy() == pytest.approx(ref_vals[::-1][:3], abs=1e-8)
    assert out['bottom_values'].numpy() == pytest.approx(ref_vals[:3], abs=1e-8)
    for i in range(3):
        cos = abs(float(out['top_vectors'][i].flatten() @ torch.from_numpy(ref_vecs[:, n - 1 - i])))
        assert cos == pytest.approx(1.0, abs=1e-6)
    assert out['top_vectors'].shape == (3, 2, 3, 5)


def test_jacobian_operator_matches_finite_differences_of_the_denoiser():
    torch.manual_seed(0)
    model = timm.create_model('gradresnet_tiny_joint', num_classes=10).double().eval()
    g = torch.Generator().manual_seed(2)
    y = torch.rand(1, 3, 9, 11, generator=g, dtype=torch.float64)
    u = torch.randn(y.shape, generator=g, dtype=torch.float64)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64)
    op = jacobian_operator(model.energy, y)
    jv = torch.from_numpy(op.matvec(v.flatten().numpy())).view_as(y)
    h = 1e-5
    with torch.no_grad():
        fd = (model.denoise(y + h * v) - model.denoise(y - h * v)) / (2 * h)
    assert torch.allclose(jv, fd, atol=1e-6, rtol=1e-5)
    ju = torch.from_numpy(op.matvec(u.flatten().numpy())).view_as(y)
    assert float((u * jv).sum()) == pytest.approx(float((v * ju).sum()), rel=1e-8)  # J symmetric


def test_wrapped_timm_classifier_export_round_trips(tmp_path):
    # train_joint.py exports a JointDensityWrapper (joint / denoising tasks on a timm classifier) under
    # the timm architecture's name; evaluate must rebuild the wrapper, its mean/std and energy head.
    torch.manual_seed(0)
    net = timm_joint.JointDensityWrapper(timm.create_model('test_resnet', num_classes=3), warn_untrained=False).eval()
    with torch.no_grad():
        net.energy_head.maps[0].weight.mul_(3.0)  # not the initial value, so a fresh head would differ
    save_pretrained(net, tmp_path / 'export', model_name='test_resnet', model_args={'num_classes': 3},
                    extra_config={'timm_joint': {'task': 'joint', 'wrapper': True}})
    loaded, info = load_model('test_resnet', str(tmp_path / 'export'))
    assert isinstance(loaded, timm_joint.JointDensityWrapper)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
        assert torch.allclose(loaded.denoise(x), net.denoise(x), atol=1e-5)


@pytest.mark.parametrize('arch, kwargs', [('dncnn_deepinv', dict(depth=3, width=8)),
                                          ('drunet_deepinv', dict(width=4, num_blocks=1))])
def test_dedicated_denoiser_gets_blind_psnr_and_no_classification(arch, kwargs, assets, tmp_path):
    pytest.importorskip('deepinv')
    net = timm.create_model(arch, **kwargs).eval()
    save_pretrained(net, tmp_path / 'export', model_name=arch, model_args=kwargs)
    r = run(['--model', f'local-dir:{tmp_path / "export"}',
             *_common(assets, tmp_path / 'o', '--sigmas', '--psnr-sigmas', '25')])
    validate_results(r)
    assert r['psnr']['cond_true']['25'] == 'n/a' and r['accuracy'] == {}
    # the same PSNR by hand (DRUNet is non-blind: it must be told sigma)
    from timm_joint.data import create_eval_dataset
    from timm_joint.metrics import psnr
    from timm_joint.robustness import fixed_eval_noise
    ds = create_eval_dataset('', assets['qs'], img_size=16)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = x + 25 / 255 * fixed_eval_noise(list(range(len(ds))), x.shape[1:], seed=0)
    with torch.no_grad():
        d = net.denoise(y, sigma=25 / 255)
    assert r['psnr']['blind']['25'] == pytest.approx(float(psnr(d, x).mean()), abs=1e-4)
    with pytest.raises(ValueError, match='no classifier'):
        run(['--model', f'local-dir:{tmp_path / "export"}', *_common(assets, tmp_path / 'o2', '--sigmas', '0')])


def test_an_unreadable_image_stops_evaluation_unless_skipped(assets, tmp_path):
    import os
    data = tmp_path / 'qs'
    shutil.copytree(assets['qs'], data)
    bad = sorted((data / 'validation').rglob('*.png'))[5]
    bad.write_bytes(os.urandom(500))
    n = len(list((data / 'validation').rglob('*.png')))
    argv = ['--model', 'gradresnet_tiny_joint', '--checkpoint', assets['tiny'], '--data-dir', str(data),
            '--img-size', '16', '--workers', '2', '--batch-size', '8', '--no-progress', '--sigmas', '0',
            '--psnr-sigmas', '25', '--eigen-k', '0', '--grid-images', '1']
    with pytest.raises(ValueError, match=f"image '{bad}' cannot be read") as e:
        run(argv + ['--out', str(tmp_path / 'strict')])
    assert '\n' not in str(e.value) and not (tmp_path / 'strict' / 'results.json').exists()
    r = run(argv + ['--out', str(tmp_path / 'skip'), '--skip-bad-images'])
    assert r['dataset']['num_images'] == n - 1  # left out, never replaced by a neighbour
    assert [s['path'] for s in r['dataset']['skipped_images']] == [str(bad)]
    assert str(bad) in (tmp_path / 'skip' / 'results.md').read_text()


def test_results_name_each_model_by_a_short_label(e2e):
    r = e2e['results']
    assert r['model']['label'] == 'gradresnet_tiny_joint'  # its export records no training task
    assert r['robustness']['reference']['label'] == 'test_resnet'
