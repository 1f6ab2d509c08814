"""timm_joint.train (train_joint.py): tasks, outputs, resume, distributed equivalence, argument handling."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from timm_joint import train as train_joint

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model', 'gradresnet_tiny_joint', '--model-kwargs', 'channels=[8,16]', 'layers=[1,1]',
        '--num-classes', '4', '--img-size', '16', '-j', '0', '--no-progress', '--log-interval', '1']




def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run(args):
    """Run train_joint.main in-process (Accelerate's singletons reset around it)."""
    _reset_accelerate()
    try:
        return train_joint.main([str(a) for a in args])
    finally:
        _reset_accelerate()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    from timm_joint.data import prepare_quickstart
    root = tmp_path_factory.mktemp('data') / 'qs'
    prepare_quickstart(root, patch_size=16, train_per_class=20, val_per_class=4, short_side=96,
                       images=('astronaut', 'brick', 'coffee', 'gravel'))
    return root


def _weights(path):
    return load_file(str(Path(path) / 'model.safetensors'))


@pytest.mark.parametrize('task', ['joint', 'classification', 'denoising'])
def test_each_task_writes_summary_args_and_loadable_export(task, data_dir, tmp_path):
    out = run(TINY + ['--data-dir', data_dir, '--task', task, '-b', '8', '--den-batch-size', '6',
                      '--epochs', '1', '--max-steps', '3', '--output', tmp_path, '--experiment', 'e'])
    assert (out / 'args.yaml').is_file()
    assert yaml.safe_load((out / 'args.yaml').read_text())['task'] == task
    rows = list(csv.DictReader(open(out / 'summary.csv')))
    assert len(rows) == 1
    if task != 'denoising':
        assert 0 <= float(rows[0]['eval_top1_s0']) <= 100
    if task != 'classification':
        assert float(rows[0]['eval_psnr_s25']) > 0
    import timm
    import timm_joint  # noqa: F401
    # The export names the architecture, so it does not depend on GradResNet's defaults.
    cfg = json.loads((out / 'export' / 'last' / 'config.json').read_text())
    if cfg['architecture'].startswith('gradresnet'):
        assert cfg['model_args']['bias'] is False and cfg['model_args']['heads'] == 'shared'
        assert cfg['model_args']['norm_layer'] == 'scalegroupnorm'
    model = timm.create_model(f'local-dir:{out / "export" / "last"}', pretrained=True).eval()
    sd = _weights(out / 'export' / 'last')
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the export differs from a fresh init: training changed the weights
    fresh = timm.create_model('gradresnet_tiny_joint', channels=[8, 16], layers=[1, 1], num_classes=4)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())


def test_resume_mid_epoch_equals_uninterrupted(data_dir, tmp_path):
    # 20 images/class x 4 classes = 80: 10 classification batches of 8 per epoch, denoising
    # batches of 24 cycle every 3 steps, so the stop at step 2 falls mid-epoch and mid-cycle.
    common = TINY + ['--data-dir', data_dir, '-b', '8', '--den-batch-size', '24', '--epochs', '1',
                     '--mixup', '0.4', '--model-ema', '--model-ema-decay', '0.5', '--output', tmp_path,
                     '--lambda-den-start', '1', '--lambda-den', '50']  # the ramp resumes at its update
    full = run(common + ['--experiment', 'full', '--max-steps', '5'])
    part = run(common + ['--experiment', 'part', '--max-steps', '2'])
    state = yaml.safe_load((part / 'checkpoints').glob('step_*').__next__().joinpath('train_state.json').read_text())
    assert state['step_in_epoch'] == 2 and state['epoch'] == 0
    resumed = run(common + ['--experiment', 'part', '--max-steps', '5'])  # auto-resume from part/checkpoints
    assert resumed == part
    for name in ('last', 'ema_last'):
        a, b = _weights(full / 'export' / name), _weights(part / 'export' / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f'{name}/{k}')


def test_lambda_ramp_follows_the_updates_and_a_flat_ramp_equals_a_constant(data_dir, tmp_path):
    # 80 images in batches of 8: 10 updates per epoch, 20 in all; the weight goes 2 -> 20 linearly.
    common = TINY + ['--data-dir', data_dir, '-b', '8', '--den-batch-size', '8', '--epochs', '2',
                     '--output', tmp_path]
    ramp = run(common + ['--experiment', 'ramp', '--lambda-den-start', '2', '--lambda-den', '20'])
    rows = list(csv.DictReader(open(ramp / 'summary.csv')))
    for epoch, row in enumerate(rows):
        mean_update = sum(range(10 * epoch, 10 * epoch + 10)) / 10
        assert float(row['train_lambda_den']) == pytest.approx(2 + 18 * mean_update / 19)
    flat = run(common + ['--experiment', 'flat', '--lambda-den-start', '5', '--lambda-den', '5'])
    const = run(common + ['--experiment', 'const', '--lambda-den-start', 'none', '--lambda-den', '5'])
    a, b = _weights(flat / 'export' / 'last'), _weights(const / 'export' / 'last')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], v) for k, v in _weights(ramp / 'export' / 'last').items())


def test_hfds_dataset_trains_exactly_as_the_image_folder(data_dir, tmp_path, monkeypatch):
    # --dataset hfds/PATH goes through timm's reader and Hugging Face datasets (its imagefolder builder on
    # the local folder, offline; --data-dir is the datasets cache): same samples in the same order, so
    # the same weights as the image-folder run.
    pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    common = TINY + ['-b', '8', '--den-batch-size', '8', '--epochs', '1', '--max-steps', '3', '--output', tmp_path]
    folder = run(common + ['--data-dir', data_dir, '--experiment', 'folder'])
    hfds = run(common + ['--dataset', f'hfds/{data_dir}', '--data-dir', tmp_path / 'hf-cache', '--experiment', 'hfds'])
    a, b = _weights(folder / 'export' / 'last'), _weights(hfds / 'export' / 'last')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize('dataset, workers', [('wds', 0), ('wds', 2), ('hfids', 0)])
def test_streamed_dataset_resumes_mid_epoch_as_uninterrupted(dataset, workers, data_dir, tmp_path, monkeypatch):
    # Streamed datasets have no sampler to skip in: the resumed run re-reads the stream, whose order is
    # fixed by (seed, epoch), in the main process or in loader workers, and drops the batches it has done.
    # 80 images: 10 classification batches an epoch, denoising passes of 7 batches; the stop at step 12
    # falls in the second epoch and the second denoising pass, whose orders the resumed run must rebuild.
    pytest.importorskip('webdataset' if dataset == 'wds' else 'datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    if dataset == 'wds':
        from timm_joint.data import write_wds
        source = ['--dataset', 'wds/', '--data-dir', write_wds(data_dir, tmp_path / 'shards', shard_size=10)]
    else:
        source = ['--dataset', f'hfids/{data_dir}', '--data-dir', tmp_path / 'hf-cache',
                  '--train-num-samples', '80', '--val-num-samples', '16']
    common = TINY[:-5] + ['-j', workers, '--no-progress', '--log-interval', '1'] + source + [
        '-b', '8', '--den-batch-size', '12', '--epochs', '2', '--output', tmp_path]
    full = run(common + ['--experiment', 'full', '--max-steps', '14'])
    run(common + ['--experiment', 'part', '--max-steps', '12'])
    part = run(common + ['--experiment', 'part', '--max-steps', '14'])
    rows = list(csv.DictReader(open(part / 'summary.csv')))
    assert 0 <= float(rows[-1]['eval_top1_s0']) <= 100
    a, b = _weights(full / 'export' / 'last'), _weights(part / 'export' / 'last')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the stream order is a function of the seed: another seed trains other batches
    other = run(common + ['--experiment', 'other', '--max-steps', '2', '--seed', '7'])
    c = _weights(other / 'export' / 'last')
    assert any(not torch.equal(c[k], v) for k, v in _weights(part / 'export' / 'last').items())


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from timm_joint.training import CheckpointManager
    (tmp_path / 'step_00000004').mkdir()            # killed before its state file was written
    (tmp_path / 'step_00000006.tmp').mkdir()        # killed while writing
    (tmp_path / 'step_00000002').mkdir()
    (tmp_path / 'step_00000002' / 'train_state.json').write_text('{}')
    assert CheckpointManager(tmp_path).latest().name == 'step_00000002'


def test_yaml_defaults_and_cli_precedence(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(yaml.safe_dump({'lr': 0.5, 'batch_size': 12, 'lambda_den': 3.0}))
    args, _ = train_joint._parse_args(['-c', str(cfg), '--lr', '0.25'])
    assert args.lr == 0.25            # the command line wins
    assert args.batch_size == 12      # the YAML sets what the command line leaves
    assert args.lambda_den == 3.0
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump({'learning_rate': 0.1}))
    with pytest.raises(SystemExit):
        train_joint._parse_args(['-c', str(bad)])
    # a config's values do not leak into a later parse in the same process
    assert train_joint._parse_args([])[0].lr == train_joint.parser.get_default('lr') != 0.5


@pytest.mark.parametrize('extra, message', [
    (['--model', 'no_such_model'], 'unknown model'),
    (['--task', 'denoising', '--mixup', '0.8'], 'contradict --task denoising'),
    (['--torchcompile'], 'double backward'),
    (['--sigma-max-den', '0'], 'must be > 0'),
    (['--mixup', '0.8', '-b', '7'], 'even --batch-size'),
    (['--lambda-den-start', '-1'], 'must be >= 0'),
    (['--dataset', 'torch/no_such_set'], 'could not open dataset'),
    (['--eval-metric', 'top1_s50'], r"'top1_s50' is not measured.*expected one of top1_s0, top1_s25, psnr_s15, "),
    (['--task', 'denoising', '--eval-metric', 'top1_s0'], 'expected one of psnr_s15, psnr_s25, psnr_s50 '),
    (['--eval-metric', 'ema_top1_s0'], 'not measured'),
])
def test_bad_options_are_refused_before_training(extra, message, data_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(TINY + ['--data-dir', data_dir, '--output', tmp_path, '--experiment', 'x'] + extra)
    assert not (tmp_path / 'x').exists()


def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(ValueError, match='does not exist'):
        run(TINY + ['--data-dir', tmp_path / 'nope', '--output', tmp_path])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        run(TINY + ['--data-dir', tmp_path / 'empty', '--output', tmp_path])
    with pytest.raises(ValueError, match='needs --data-dir'):
        run(TINY + ['--dataset', 'wds/', '--output', tmp_path])
    with pytest.raises(ValueError, match='does not exist'):
        run(TINY + ['--dataset', 'wds/', '--data-dir', tmp_path / 'nope', '--output', tmp_path])
    pytest.importorskip('webdataset')
    with pytest.raises(ValueError, match='_info.json'):  # shards without their index
        run(TINY + ['--dataset', 'wds/', '--data-dir', tmp_path / 'empty', '--output', tmp_path])


def test_mismatched_resume_is_refused_and_nothing_overwritten(data_dir, tmp_path):
    out = run(TINY + ['--data-dir', data_dir, '-b', '8', '--epochs', '1', '--max-steps', '1',
                      '--output', tmp_path, '--experiment', 'a'])
    ckpt = next((out / 'checkpoints').glob('step_*'))
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    # a different architecture cannot load that state
    with pytest.raises(ValueError, match='does not fit'):
        run(TINY[:3] + ['channels=[8,32]', 'layers=[1,1]'] + TINY[5:] + [
            '--data-dir', data_dir, '-b', '8', '--resume', ckpt, '--output', tmp_path, '--experiment', 'a'])
    # a corrupt state file
    bad = tmp_path / 'bad_ckpt'
    bad.mkdir()
    (bad / 'train_state.json').write_text('{not json')
    with pytest.raises(ValueError, match='corrupt'):
        run(TINY + ['--data-dir', data_dir, '--resume', bad, '--output', tmp_path, '--experiment', 'a'])
    after = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert after == before


def test_non_finite_loss_stops_and_keeps_last_good_export(data_dir, tmp_path):
    common = TINY + ['--data-dir', data_dir, '-b', '8', '--epochs', '1', '--output', tmp_path,
                     '--experiment', 'nan', '--checkpoint-interval', '1']
    out = run(common + ['--max-steps', '1'])
    good = _weights(out / 'export' / 'last')
    with pytest.raises(SystemExit):
        run(common + ['--max-steps', '3', '--lambda-den', 'inf'])
    kept = _weights(out / 'export' / 'last')
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in kept.values())


def test_two_processes_equal_one_process_on_the_union(data_dir, tmp_path):
    """torchrun with 2 gloo processes, batch b each == 1 process with batch 2b (SGD, one step)."""
    common = TINY + ['--data-dir', data_dir, '--opt', 'momentum', '--momentum', '0', '--lr', '0.5',
                     '--weight-decay', '0', '--epochs', '1', '--max-steps', '1', '--output', tmp_path]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
           str(ROOT / 'train_joint.py')] + [str(a) for a in common] + [
           '-b', '4', '--den-batch-size', '3', '--experiment', 'ddp']
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'terminate called' not in res.stderr
    single = run(common + ['-b', '8', '--den-batch-size', '6', '--experiment', 'single'])
    init = run(common + ['-b', '8', '--den-batch-size', '6', '--experiment', 'init', '--lr', '0'])
    a, b, w0 = (_weights(p / 'export' / 'last') for p in (tmp_path / 'ddp', single, init))
    moved = 0
    for k in a:
        # Compare the updates, not the weights: an update is small next to the weights it changes.
        da, db = a[k] - w0[k], b[k] - w0[k]
        torch.testing.assert_close(da, db, rtol=1e-3, atol=1e-8, msg=k)
        moved += int(db.abs().max() > 1e-6)
    assert moved > len(a) // 2   # the step changed most tensors: the comparison is not vacuous


def test_two_processes_run_the_schedule_they_plan(data_dir, tmp_path):
    """The lr schedule and the lambda ramp span the updates each process runs: with 2 processes an epoch
    has half the batches of one process's pass, and a ramp 0 -> 100 over one epoch averages 50 (a schedule
    counted in both processes' batches would end halfway, at 25)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    args = TINY + ['--data-dir', data_dir, '--epochs', '1', '-b', '4', '--den-batch-size', '3',
                   '--lambda-den-start', '0', '--lambda-den', '100', '--output', tmp_path, '--experiment', 'ddp']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29519',
           str(ROOT / 'train_joint.py')] + [str(a) for a in args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    row = list(csv.DictReader(open(tmp_path / 'ddp' / 'summary.csv')))[-1]
    assert float(row['train_lambda_den']) == pytest.approx(50., abs=1e-6)
    assert float(row['lr']) == pytest.approx(0., abs=1e-9)  # the cosine ended with the epoch


def test_two_processes_on_a_stream_validate_each_sample_once(data_dir, tmp_path):
    """torchrun with 2 gloo processes on wds/ shards (fewer validation shards than ranks): training splits
    the stream by rank, validation reads every sample once over both ranks; the validation numbers equal
    those of one process evaluating the exported weights (eval noise follows the sample, not the rank)."""
    pytest.importorskip('webdataset')
    from timm_joint.data import create_eval_dataset, write_wds
    from timm_joint.training import DeviceLoader, validate
    shards = write_wds(data_dir, tmp_path / 'shards', shard_size=20)  # 4 train shards, 1 validation shard
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    args = TINY + ['--dataset', 'wds/', '--data-dir', shards, '--epochs', '1', '--max-steps', '3', '-b', '4',
                   '--den-batch-size', '3', '--val-sigmas', '0', '25', '--output', tmp_path, '--experiment', 'ddp']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29518',
           str(ROOT / 'train_joint.py')] + [str(a) for a in args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'terminate called' not in res.stderr
    row = list(csv.DictReader(open(tmp_path / 'ddp' / 'summary.csv')))[-1]

    import timm
    from accelerate import Accelerator
    _reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        model = timm.create_model(f'local-dir:{tmp_path / "ddp" / "export" / "last"}', pretrained=True)
        ds = create_eval_dataset('wds/', str(shards), img_size=16)
        loader = DeviceLoader(torch.utils.data.DataLoader(ds, batch_size=5), accelerator.device)
        ours = validate(model, loader, accelerator, acc_sigmas_255=[0, 25], psnr_sigmas_255=[15, 25, 50],
                        seed=42, progress=False, streamed=True)
        # the streamed path (local sums) against the gathered path over the same single-process loader
        gathered = validate(model, loader, accelerator, acc_sigmas_255=[0, 25], psnr_sigmas_255=[15, 25, 50],
                            seed=42, progress=False)
    finally:
        _reset_accelerate()
    assert ours.keys() == gathered.keys() == {'top1_s0', 'top1_s25', 'psnr_s15', 'psnr_s25', 'psnr_s50', 'num_images'}
    # each of the 16 validation images once, over the two ranks as in one process
    assert int(row['eval_num_images']) == ours['num_images'] == gathered['num_images'] == 16
    for k, v in ours.items():
        assert v == pytest.approx(gathered[k], rel=1e-5), k
        assert float(row[f'eval_{k}']) == pytest.approx(v, rel=1e-4, abs=1e-3), k


def test_streams_refuse_too_few_shards_and_a_resume_with_other_readers(data_dir, tmp_path):
    # A wds reader (rank x loader worker) without a shard yields nothing while the epoch counts its share.
    pytest.importorskip('webdataset')
    from timm_joint.data import write_wds
    shards = write_wds(data_dir, tmp_path / 'shards', shard_size=40)  # 2 training shards
    common = TINY[:-5] + ['--no-progress', '--dataset', 'wds/', '--data-dir', shards, '-b', '8',
                          '--epochs', '1', '--output', tmp_path]
    with pytest.raises(ValueError, match='2 shard'):
        run(common + ['-j', '3', '--experiment', 'few'])
    assert not (tmp_path / 'few').exists()
    # the stream's order depends on the number of readers: a resume with another one is refused
    out = run(common + ['-j', '0', '--experiment', 'r', '--max-steps', '2'])
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    with pytest.raises(ValueError, match='readers'):
        run(common + ['-j', '2', '--experiment', 'r', '--max-steps', '4'])
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before


def test_denoising_baselines_train_with_the_same_script(data_dir, tmp_path):
    pytest.importorskip('deepinv')
    import timm
    for name, kwargs in (('dncnn_deepinv', ['depth=3', 'width=8']), ('drunet_deepinv', ['width=4', 'num_blocks=1'])):
        # --num-classes comes with a shared config; a denoiser has no classifier and ignores it
        out = run(['--model', name, '--model-kwargs', *kwargs, '--task', 'denoising', '--img-size', '16',
                   '--num-classes', '4',
                   '-j', '0', '--no-progress', '--data-dir', data_dir, '-b', '6', '--epochs', '1',
                   '--max-steps', '2', '--output', tmp_path, '--experiment', name])
        rows = list(csv.DictReader(open(out / 'summary.csv')))
        assert float(rows[0]['eval_psnr_s25']) > 0 and 'eval_top1_s0' not in rows[0]
        net = timm.create_model(f'local-dir:{out / "export" / "last"}', pretrained=True).eval()
        y = torch.rand(2, 3, 16, 16)
        assert net.denoise(y, sigma=25 / 255).shape == y.shape


def test_gradient_accumulation_and_bf16(data_dir, tmp_path):
    out = run(TINY + ['--data-dir', data_dir, '-b', '4', '--epochs', '1', '--max-steps', '2', '--grad-accum-steps', '3',
                      '--mixed-precision', 'bf16', '--output', tmp_path, '--experiment', 'acc'])
    state = yaml.safe_load(next((out / 'checkpoints').glob('step_*')).joinpath('train_state.json').read_text())
    assert state['num_updates'] == 2 and state['step_in_epoch'] == 6   # 3 batches per optimizer step
    assert all(torch.isfinite(v).all() for v in _weights(out / 'export' / 'last').values())


def test_timm_classifier_export_states_its_training_size_and_raw_pixels(data_dir, tmp_path):
    import timm
    out = run(['--model', 'test_resnet', '--task', 'classification', '--num-classes', '4', '--img-size', '16',
               '-j', '0', '--no-progress', '--data-dir', data_dir, '-b', '8', '--epochs', '1', '--max-steps', '1',
               '--output', tmp_path, '--experiment', 'r'])
    net = timm.create_model(f'local-dir:{out / "export" / "last"}', pretrained=True)
    cfg = timm.data.resolve_data_config({}, model=net)
    assert tuple(cfg['input_size']) == (3, 16, 16)
    assert tuple(cfg['mean']) == (0., 0., 0.) and tuple(cfg['std']) == (1., 1., 1.)


def test_config_falls_back_to_the_packaged_recipe_and_a_local_file_wins(tmp_path, monkeypatch):
    # From a folder without configs/ (as after a wheel install), -c configs/NAME.yaml is the packaged recipe.
    monkeypatch.chdir(tmp_path)
    packaged = yaml.safe_load((ROOT / 'configs' / 'quickstart.yaml').read_text())
    for name in ('configs/quickstart.yaml', 'quickstart.yaml'):
        args, _ = train_joint._parse_args(['-c', name])
        assert args.model == packaged['model'] and args.lr == packaged['lr'] and args.config == name
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'quickstart.yaml').write_text(yaml.safe_dump({'lr': 0.125}))
    assert train_joint._parse_args(['-c', 'configs/quickstart.yaml'])[0].lr == 0.125
    with pytest.raises(SystemExit):  # only bare names and configs/NAME fall back, never another path
        train_joint._parse_args(['-c', str(tmp_path / 'elsewhere' / 'cifar10_joint.yaml')])


def test_cli_turns_bad_options_into_one_error_line_and_status_2(tmp_path, capsys):
    assert train_joint.cli(['--model', 'no_such_model', '--data-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'error: unknown model' in err[0]


def test_pretrained_weights_that_cannot_be_had_are_one_error_line(data_dir, tmp_path, capsys, monkeypatch):
    import timm_joint.io
    monkeypatch.setattr(timm_joint.io, '_hub_offline', lambda: True)  # HF_HUB_OFFLINE, read when asked
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty_hf_home'))
    _reset_accelerate()
    try:
        assert train_joint.cli(['--model', 'gradresnet_tiny_joint', '--pretrained', '--data-dir', str(data_dir),
                                '--output', str(tmp_path)]) == 2
    finally:
        _reset_accelerate()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--pretrained: pretrained weights for' in err[0] and 'HF_HUB_OFFLINE' in err[0], err


def test_an_unreadable_image_stops_training_unless_skipped_and_counted(data_dir, tmp_path, capsys):
    import os
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    bad = sorted((data / 'validation').rglob('*.png'))[0]
    bad.write_bytes(os.urandom(500))
    n_val = len(list((data / 'validation').rglob('*.png')))
    common = TINY + ['--data-dir', data, '-b', '8', '--epochs', '1', '--max-steps', '2', '--output', tmp_path]
    _reset_accelerate()
    try:
        assert train_joint.cli([str(a) for a in common + ['--experiment', 'strict']]) == 2
    finally:
        _reset_accelerate()
    err = [line for line in capsys.readouterr().err.strip().splitlines() if 'error' in line]
    assert len(err) == 1 and f"image '{bad}' cannot be read" in err[0] and '--skip-bad-images' in err[0], err

    out = run(common + ['--experiment', 'skip', '--skip-bad-images'])
    (row,) = list(csv.DictReader(open(out / 'summary.csv')))
    assert int(row['eval_num_images']) == n_val - 1  # left out, not replaced by its neighbour
    assert row['eval_skipped_val_images'] == '1' and row['eval_skipped_train_images'] == '0'
    assert f'left out {bad}: UnidentifiedImageError' in (out / 'log.txt').read_text()


def test_console_shows_progress_validations_and_summary_and_the_log_file_the_rest(data_dir, tmp_path, capfd):
    out = run(TINY + ['--data-dir', data_dir, '-b', '8', '--epochs', '3', '--eval-interval', '1',
                      '--log-interval', '1000', '--output', tmp_path, '--experiment', 'log', '--threads', '1'])
    console = capfd.readouterr().err
    lines = [line for line in console.splitlines() if line.strip()]
    validations = [line for line in lines if line.startswith('epoch ') and ' update ' in line]
    assert len(validations) == 3, lines
    assert not any('[RANK' in line or 'saved in' in line or 'Saving' in line for line in lines), lines
    assert lines[1] == 'CPU threads: 1 per process (--threads)'
    assert lines[-1] == f'Outputs in {out} (log: {out / "log.txt"})' and lines[-2].startswith('*** Best top1_s0')
    assert len(lines) == 2 + len(validations) + 2, lines  # threads, model; validations; best, outputs
    log = (out / 'log.txt').read_text()
    assert '[RANK 0] Saving current state' in log and 'saved in' in log
    assert all(line in log for line in lines)
    import logging
    assert not any(type(h).__name__ in ('_ConsoleHandler', 'FileHandler', 'MemoryHandler')
                   for h in logging.getLogger().handlers)  # nothing left behind for the next run in this process


def test_quickstart_validates_at_least_three_times(tmp_path):
    args, _ = train_joint._parse_args(['-c', str(ROOT / 'configs' / 'quickstart.yaml')])
    assert args.epochs // args.eval_interval >= 3, (args.epochs, args.eval_interval)


def test_a_refused_run_writes_no_log(data_dir, tmp_path):
    with pytest.raises(ValueError):
        run(TINY + ['--data-dir', data_dir, '--output', tmp_path, '--experiment', 'x', '--lambda-den', '-1'])
    assert not (tmp_path / 'x').exists()


def test_torchcompile_trains_classification_as_the_uncompiled_run(data_dir, tmp_path):
    # Accelerate compiles the prepared model (dynamo; the 'eager' backend is cheap and exact): the same
    # weights as the run without it, and a compiled module was actually in use.
    common = TINY + ['--data-dir', data_dir, '--task', 'classification', '-b', '8', '--epochs', '1',
                     '--max-steps', '2', '--output', tmp_path]
    import torch._dynamo
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = run(common + ['--experiment', 'compiled', '--torchcompile', 'eager'])
    assert counts['stats']['unique_graphs'] > 0
    plain = run(common + ['--experiment', 'plain'])
    a, b = _weights(compiled / 'export' / 'last'), _weights(plain / 'export' / 'last')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
