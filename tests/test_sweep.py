"""timm_joint.sweep: equal-budget runs through train_joint.py, one table."""

import csv
import json

import pytest
import yaml

from timm_joint import sweep


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    """A three-class patch set registered as the sweep dataset 'tiny', and a two-stage model config."""
    from timm_joint.data import prepare_quickstart
    data = tmp_path / 'qs'
    prepare_quickstart(data, patch_size=16, train_per_class=12, val_per_class=3, short_side=96,
                       images=('astronaut', 'brick', 'coffee'))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(yaml.safe_dump({
        'model': 'gradresnet_tiny_joint', 'model_kwargs': ['channels=[8,16]', 'layers=[1,1]'],
        'num_classes': 3, 'img_size': 16, 'batch_size': 6, 'epochs': 1, 'workers': 0}))
    monkeypatch.setitem(sweep.DATASETS, 'tiny', (str(data), 'quickstart'))
    monkeypatch.setattr(sweep, '_prepare', lambda *a, **k: None)
    return cfg


def test_sweep_runs_variants_at_equal_budget_and_reuses_finished_ones(tmp_path, tiny_cfg):
    cfg = tiny_cfg
    out = tmp_path / 'sweep'
    records = sweep.run_sweep('tasks', config=str(cfg), dataset='tiny', steps=2, out=out,
                              variants=['classification only', 'denoising only'])
    assert [r['variant'] for r in records] == ['classification only', 'denoising only']
    assert 'top1_s0' in records[0] and 'psnr_s25' not in records[0]
    assert 'psnr_s25' in records[1] and 'top1_s0' not in records[1]
    args = yaml.safe_load((out / 'classification_only_seed42' / 'args.yaml').read_text())
    assert args['max_steps'] == 2 and args['task'] == 'classification'
    # a finished variant is read back, not retrained
    stamp = (out / 'denoising_only_seed42' / 'summary.csv').stat().st_mtime_ns
    again = sweep.run_sweep('tasks', config=str(cfg), dataset='tiny', steps=2, out=out, variants=['denoising only'])
    assert (out / 'denoising_only_seed42' / 'summary.csv').stat().st_mtime_ns == stamp
    assert again[0]['psnr_s25'] == records[1]['psnr_s25']
    table = sweep.render_table(records)
    assert table.count('\n') == 3 and 'n/a' in table


def test_seeds_are_separate_runs_and_the_table_shows_their_mean_and_spread(tmp_path, tiny_cfg):
    cfg = tiny_cfg
    out = tmp_path / 'sweep'
    [rec] = sweep.run_sweep('tasks', config=str(cfg), dataset='tiny', steps=2, out=out,
                            variants=['denoising only'], seeds=[0, 1])
    values = []
    for seed in (0, 1):
        run_dir = out / f'denoising_only_seed{seed}'
        assert yaml.safe_load((run_dir / 'args.yaml').read_text())['seed'] == seed
        values.append(float(list(csv.DictReader(open(run_dir / 'summary.csv')))[-1]['eval_psnr_s25']))
    assert values[0] != values[1]  # different seeds, different runs
    assert rec['psnr_s25'] == pytest.approx(sum(values) / 2)
    assert rec['psnr_s25_std'] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert [r['seed'] for r in rec['per_seed']] == [0, 1]
    assert f"{rec['psnr_s25']:.2f} ± {rec['psnr_s25_std']:.2f}" in sweep.render_table([rec])
    with pytest.raises(ValueError, match='distinct'):
        sweep.run_sweep('tasks', config=str(cfg), dataset='tiny', steps=2, out=out, seeds=[1, 1])
    with pytest.raises(SystemExit):
        sweep.main(['--preset', 'tasks', '--', '--seed', '3'])


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match='unknown preset'):
        sweep.run_sweep('nope', config='x', dataset='quickstart', steps=1, out=tmp_path)


def test_table1_smoke_trains_and_evaluates_each_model_with_the_same_command(tmp_path, monkeypatch):
    """CI's small version of the Table-1 command: a GradResNet and a deepinv baseline, two steps each."""
    pytest.importorskip('deepinv')
    from timm_joint.data import prepare_quickstart
    data = tmp_path / 'qs'
    prepare_quickstart(data, patch_size=16, train_per_class=8, val_per_class=2, short_side=96,
                       images=('astronaut', 'brick', 'coffee'))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(yaml.safe_dump({'model': 'gradresnet_tiny_joint', 'num_classes': 3, 'img_size': 16,
                                   'batch_size': 6, 'epochs': 1, 'workers': 0}))
    monkeypatch.setitem(sweep.DATASETS, 'tiny', (str(data), 'quickstart'))
    monkeypatch.setattr(sweep, '_prepare', lambda *a, **k: None)
    out = tmp_path / 'table1'
    names = ['joint', 'DnCNN (depth 6, width 16), denoising only']
    records = sweep.run_sweep('table1', config=str(cfg), dataset='tiny', steps=2, out=out, variants=names,
                              evaluate=True)
    by_name = {r['variant']: r for r in records}
    assert sorted(by_name) == sorted(names)
    for name, r in by_name.items():
        res = json.loads((out / f"{name.replace(' ', '_')}_seed42" / 'eval' / 'results.json').read_text())
        assert r['psnr_s25'] == res['psnr']['blind']['25']      # the table is the evaluate command's output
    assert 'top1_s0' in by_name[names[0]] and 'top1_s0' not in by_name[names[1]]
