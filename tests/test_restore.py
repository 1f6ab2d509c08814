"""``python -m timm_joint.restore``: its physics, images and schedule, and the command end to end on tiny
models (a joint GradResNet and the DnCNN baseline), its results schema and its refusals."""
import json
import math

import pytest
import timm
import torch

import timm_joint  # noqa: F401  (registers the models)
from timm_joint.data import QUICKSTART_IMAGES
from timm_joint.hub import save_pretrained

dinv = pytest.importorskip('deepinv')
from timm_joint.restore import (  # noqa: E402
    HELD_OUT_IMAGES, PROBLEMS, dpir_schedule, held_out_images, main, make_physics, measurement_estimate, run,
    validate_results,
)


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp('restore')
    torch.manual_seed(0)
    joint = timm.create_model('gradresnet_tiny_joint', num_classes=4).eval()
    save_pretrained(joint, root / 'joint', model_name='gradresnet_tiny_joint', model_args={'num_classes': 4})
    dncnn = timm.create_model('dncnn_deepinv', depth=3, width=8).eval()
    save_pretrained(dncnn, root / 'dncnn', model_name='dncnn_deepinv', model_args={'depth': 3, 'width': 8})
    plain = timm.create_model('resnet18', num_classes=4).eval()
    save_pretrained(plain, root / 'plain', model_name='resnet18', model_args={'num_classes': 4})
    return root


def test_held_out_images():
    assert not set(HELD_OUT_IMAGES) & set(QUICKSTART_IMAGES) and 'cat' not in HELD_OUT_IMAGES  # cat is chelsea
    x = held_out_images(24, ('china', 'coins'))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.02
    torch.testing.assert_close(x[1, 0], x[1, 2])  # a grey photograph: three equal channels
    with pytest.raises(ValueError, match='unknown image'):
        held_out_images(16, ('astronaut',))
    with pytest.raises(ValueError, match='image size'):
        held_out_images(512)


@pytest.mark.parametrize('problem', PROBLEMS)
def test_physics(problem):
    x = held_out_images(16, ('china', 'flower'))
    physics = make_physics(problem, (3, 16, 16), noise_sigma=5 / 255, seed=0)
    y = physics(x)
    assert y.shape == ((2, 3, 4, 4) if problem == 'sr' else x.shape)
    # seeded: the same seed gives the same measurement, noise included
    torch.testing.assert_close(make_physics(problem, (3, 16, 16), noise_sigma=5 / 255, seed=0)(x), y)
    x0 = measurement_estimate(problem, physics, y, (3, 16, 16))
    assert x0.shape == x.shape
    if problem == 'inpaint':
        mask = physics.mask.expand_as(y)
        assert abs(float(mask.mean()) - 0.5) < 0.15
        torch.testing.assert_close(mask[:, 0], mask[:, 1])  # the same pixels are missing in every channel
        torch.testing.assert_close(x0 * mask, y * mask)
        fill = (x0 * (1 - mask)).sum((2, 3)) / (1 - mask).sum((2, 3))
        torch.testing.assert_close(fill, (y * mask).sum((2, 3)) / mask.sum((2, 3)))
    # the estimate is closer to x than a constant image: it carries the measurement's information
    assert float(((x0 - x) ** 2).mean()) < float(((x - x.mean()) ** 2).mean())


def test_physics_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match='multiples'):
        make_physics('sr', (3, 18, 18), noise_sigma=0.01)
    with pytest.raises(ValueError, match='does not fit'):
        make_physics('deblur', (3, 8, 8), noise_sigma=0.01, blur_sigma=3.0)
    with pytest.raises(ValueError, match='unknown problem'):
        make_physics('denoise', (3, 16, 16), noise_sigma=0.01)
    with pytest.raises(ValueError, match='noise_sigma'):
        make_physics('deblur', (3, 16, 16), noise_sigma=-1.)
    with pytest.raises(ValueError, match='inpaint_fraction'):
        make_physics('inpaint', (3, 16, 16), noise_sigma=0.01, inpaint_fraction=1.5)


def test_dpir_schedule():
    sig, gam = dpir_schedule(5 / 255, 8)
    assert len(sig) == len(gam) == 8
    assert math.isclose(sig[0], 49 / 255) and math.isclose(sig[-1], 5 / 255)
    assert all(a > b for a, b in zip(sig, sig[1:]))  # geometric, decreasing
    assert math.isclose(gam[-1], 1 / 0.23)  # gamma_k = (sigma_k / sigma_n)^2 / mu
    sig, gam = dpir_schedule(1 / 255, 4)
    assert math.isclose(gam[-1], (1 / 255 / 0.01) ** 2 / 0.23)  # DPIR: sigma_n floored at 0.01 in gamma
    assert math.isclose(sig[1] / sig[0], sig[2] / sig[1])


def test_restore_end_to_end(exports, tmp_path, capsys):
    out = tmp_path / 'out'
    argv = ['--models', f'local-dir:{exports / "joint"}', f'local-dir:{exports / "dncnn"}',
            '--labels', 'joint', 'dncnn', '--sizes', '16', '--images', 'china', 'coins', '--iterations', '2',
            '--noise', '5', '10', '--out', str(out), '--no-progress', '--grid-images', '2']
    results = run(argv)
    validate_results(results)
    on_disk = json.loads((out / 'results.json').read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (out / 'results.md').exists() and (out / 'figures' / 'restoration.png').stat().st_size > 1000
    assert on_disk['schema_version'] == 1 and on_disk['kind'] == 'restoration'
    assert on_disk['noise'] == ['5', '10'] and on_disk['units']['sigma'] == '0-255'
    for metric in ('psnr', 'ssim'):
        assert set(on_disk[metric]) == set(PROBLEMS)
        for problem in PROBLEMS:
            assert set(on_disk[metric][problem]) == {'measurement', 'joint', 'dncnn'}
            assert set(on_disk[metric][problem]['joint']) == {'5', '10'}
            assert set(on_disk[f'{metric}_by_size'][problem]['joint']) == {'16'}
    assert on_disk['models']['joint']['blind'] and on_disk['models']['joint']['potential']
    assert on_disk['models']['dncnn']['blind'] and not on_disk['models']['dncnn']['potential']
    # the measurement row is the same for every prior (the solvers' common starting point)
    assert on_disk['gain_db']['deblur']['joint']['5'] == pytest.approx(
        on_disk['psnr']['deblur']['joint']['5'] - on_disk['psnr']['deblur']['measurement']['5'])
    # more measurement noise, a worse measurement
    for problem in PROBLEMS:
        assert on_disk['psnr'][problem]['measurement']['10'] < on_disk['psnr'][problem]['measurement']['5']
    assert 'python -m timm_joint.restore --models' in on_disk['command']

    # an existing result is never replaced without --overwrite
    with pytest.raises(FileExistsError, match='--overwrite'):
        run(argv)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and '--overwrite' in capsys.readouterr().err
    results = run(argv + ['--overwrite', '--algorithm', 'red', '--problems', 'inpaint'])
    assert results['algorithm']['name'] == 'red' and set(results['psnr']) == {'inpaint'}


def test_restore_bad_input(exports, tmp_path):
    base = ['--models', f'local-dir:{exports / "joint"}', '--out', str(tmp_path / 'o'), '--no-progress',
            '--images', 'china', '--iterations', '1']
    with pytest.raises(ValueError, match='unknown problem'):
        run(base + ['--problems', 'denoise'])
    with pytest.raises(ValueError, match='unknown --images'):
        run(base[:-4] + ['--images', 'astronaut'])
    with pytest.raises(ValueError, match='no denoiser'):
        run(['--models', f'local-dir:{exports / "plain"}', '--out', str(tmp_path / 'p'), '--no-progress'])
    with pytest.raises(ValueError, match='--labels'):
        run(base + ['--labels', 'a', 'b'])
    with pytest.raises(ValueError, match='noise'):
        run(base + ['--noise', '-5'])
    assert not (tmp_path / 'o' / 'results.json').exists()


@pytest.mark.parametrize('extra, message', [
    (['--sizes', '18', '--problems', 'sr'], 'not a multiple of --sr-factor 4'),
    (['--sizes', '512'], r'must be in \[8, 256\]'),
])
def test_sizes_that_cannot_be_restored_are_refused_before_any_work(extra, message, tmp_path):
    # 'no_such_model' would fail to load: the size error comes first, before any model or solve.
    with pytest.raises(ValueError, match=message):
        run(['--models', 'no_such_model', '--out', str(tmp_path / 'r')] + extra)
    assert not (tmp_path / 'r').exists()
