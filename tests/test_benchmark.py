"""The benchmark command: smoke mode end to end, its JSON schema, targets and the JEM sampler.

No timing assertions: only the structure and the arithmetic of what the benchmark reports.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

from timm_joint import benchmark as bm


@pytest.fixture(scope='module')
def smoke_doc(tmp_path_factory):
    """One in-process smoke run (tiny model, every case but deepinv's), as written to disk."""
    out = tmp_path_factory.mktemp('bench') / 'smoke.json'
    bm.main(['--smoke', '--in-process', '--out', str(out)])
    with open(out) as f:
        return json.load(f)


def test_smoke_run_writes_valid_json(smoke_doc):
    bm.validate_results(smoke_doc)  # raises on any schema problem
    assert smoke_doc['schema_version'] == bm.SCHEMA_VERSION
    by_case = {r['case']: r for r in smoke_doc['results']}
    assert set(by_case) == set(bm.CASES)
    for case, (_, _, family) in bm.CASES.items():
        r = by_case[case]
        assert r['img_size'] == 32 and r['batch_size'] == 4
        if family == 'deepinv':
            assert r['status'] == 'skipped'
        else:
            assert r['status'] == 'ok', r['error']
            assert r['model'] == ('gradresnet_tiny_joint' if family == 'ours' else r['model'])
            assert len(r['times_s']) == 1 and r['median_s'] == r['times_s'][0] > 0
            # In-process on a CPU, ru_maxrss cannot isolate a case: memory is reported as not measured.
            assert r['peak_mem_bytes'] is None and r['mem_method'] == 'not measured (in-process)'
    assert by_case['train_jem']['sgld_steps'] == 2
    names = {t['name'] for t in smoke_doc['targets']}
    assert names == {t[0] for t in bm.TARGETS}
    t_drunet = [t for t in smoke_doc['targets'] if t['name'] == 'denoise_vs_drunet'][0]
    assert t_drunet['value'] is None and t_drunet['passed'] is None  # deepinv skipped in smoke
    t_den = [t for t in smoke_doc['targets'] if t['name'] == 'denoise_vs_forward'][0]
    assert t_den['value'] == pytest.approx(by_case['denoise_blind']['median_s'] / by_case['cls_forward']['median_s'])


def test_smoke_markdown(smoke_doc):
    md = bm.render_markdown(smoke_doc)
    assert '| blind denoise D(y) | gradresnet_tiny_joint |' in md
    assert md.count('| blind denoise throughput / DRUNet throughput | cpu | 32 px | - |') == 1
    assert 'n/a (no result for drunet)' in md


@pytest.mark.parametrize('breakage, message', [
    (lambda d: d.update(schema_version=99), 'schema_version'),
    (lambda d: d.update(schema='something else'), 'schema must be'),
    (lambda d: d.update(results=[]), 'results must be a non-empty list'),
    (lambda d: d['config'].pop('repeats'), 'config.repeats'),
    (lambda d: _first_ok(d).update(median_s=2 * _first_ok(d)['median_s']), 'median of times_s'),
    (lambda d: _first_ok(d).update(img_per_s=1.0 + _first_ok(d)['img_per_s']), 'batch_size / median_s'),
    (lambda d: _first_ok(d).update(times_s=[]), 'non-empty list of positive seconds'),
    (lambda d: _first_ok(d).update(status='fine'), 'status must be one of'),
    (lambda d: _first_ok(d).update(peak_mem_bytes=-1), 'peak_mem_bytes'),
    (lambda d: _first_measured_target(d).update(passed=not _first_measured_target(d)['passed']), 'disagrees'),
])
def test_validator_rejects_broken_json(smoke_doc, breakage, message):
    doc = copy.deepcopy(smoke_doc)
    breakage(doc)
    with pytest.raises(ValueError, match=message):
        bm.validate_results(doc)


def test_validator_rejects_non_object():
    with pytest.raises(ValueError, match='JSON object'):
        bm.validate_results([1, 2])


def _first_ok(doc):
    return [r for r in doc['results'] if r['status'] == 'ok'][0]


def _first_measured_target(doc):
    return [t for t in doc['targets'] if t['value'] is not None][0]


def _result(case, median_s, batch_size=8, mem=None, size=32):
    return dict(case=case, img_size=size, device='cpu', status='ok', batch_size=batch_size,
                times_s=[median_s], median_s=median_s, img_per_s=batch_size / median_s,
                peak_mem_bytes=mem, mem_method='ru_maxrss')


def test_targets_hand_computed():
    results = [
        _result('cls_forward', 1.0), _result('denoise_blind', 1.8, mem=300),
        _result('forward_grad', 1.1, mem=200),  # memory ratio 300 / 200 = 1.5: on the bound, passes
        _result('train_cls', 2.0), _result('train_den', 5.0),  # 2.5 > 2.3: miss
        _result('train_joint', 6.0), _result('train_jem', 36.0),  # 6 >= 5: pass
        _result('drunet', 4.0),  # throughput ratio (8 / 1.8) / (8 / 4) = 2.22 >= 2: pass
    ]
    got = {t['name']: t for t in bm.compute_targets(results)}
    expect = {'denoise_vs_forward': (1.8, True), 'den_step_vs_cls_step': (2.5, False),
              'jem_vs_joint': (6.0, True), 'denoise_vs_drunet': (4.0 / 1.8, True), 'denoise_memory': (1.5, True)}
    for name, (value, passed) in expect.items():
        assert got[name]['value'] == pytest.approx(value), name
        assert got[name]['passed'] is passed, name
    # At 224 px the DRUNet bound is 8x; the same numbers miss it.
    results_224 = [dict(r, img_size=224) for r in results]
    got_224 = {t['name']: t for t in bm.compute_targets(results_224)}
    assert got_224['denoise_vs_drunet']['target'] == 8.0 and got_224['denoise_vs_drunet']['passed'] is False


def test_time_ratio_is_per_image():
    # Two batch sizes: the ratio compares seconds per image, not seconds per step.
    a, b = _result('denoise_blind', 2.0, batch_size=4), _result('cls_forward', 2.0, batch_size=8)
    assert bm._ratio(a, b, 'time') == pytest.approx(2.0)
    assert bm._ratio(a, b, 'throughput') == pytest.approx(0.5)


def test_jem_sgld_step_matches_hand_gradient():
    # A linear classifier l(x) = W vec(x): grad_x logsumexp(l) = W^T softmax(l), computed by hand.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 5, bias=False)).double().train()
    x0 = torch.rand(4, 2, 3, 3, dtype=torch.float64)
    w = model[1].weight.detach()
    expected = x0 + 0.5 * (torch.softmax(x0.flatten(1) @ w.T, dim=1) @ w).view_as(x0)
    got = bm.jem_sgld_sample(model, x0, n_steps=1, step_size=0.5, noise_std=0.0)
    torch.testing.assert_close(got, expected)
    assert model.training and not got.requires_grad
    # Two steps are two applications of the one-step map.
    two = bm.jem_sgld_sample(model, x0, n_steps=2, step_size=0.5, noise_std=0.0)
    torch.testing.assert_close(two, bm.jem_sgld_sample(model, expected, n_steps=1, step_size=0.5, noise_std=0.0))


def test_memory_measured_in_a_fresh_process():
    spec = dict(case='forward_grad', img_size=32, batch_size=8, device='cpu', model='gradresnet_tiny_joint',
                num_classes=10, repeats=1, warmup=0, jem_steps=1, jem_repeats=1, memory_steps=1, seed=0,
                channels_last=False, threads=1)
    # A large parent: a spawned child's ru_maxrss starts at the parent's resident size (Linux keeps
    # it across execve), which once hid the whole case (growth 0); the child must not see it.
    ballast = torch.ones(80_000_000)  # 320 MB resident here
    mem = bm._guarded(bm._memory_case, spec, True, lambda e: pytest.fail(e), env=bm.MEMORY_ENV)
    del ballast
    assert mem['mem_error'] is None
    # The fresh process saw the allocator setting (so it really was a new process with that env).
    assert mem['mem_method'] in ('VmHWM (MALLOC_MMAP_THRESHOLD_=131072)', 'ru_maxrss (MALLOC_MMAP_THRESHOLD_=131072)')
    # A forward with grad keeps at least the stem's output, [8, 16, 32, 32] float32, for backward.
    assert isinstance(mem['peak_mem_bytes'], int) and mem['peak_mem_bytes'] >= 8 * 16 * 32 * 32 * 4
    assert 'MALLOC_MMAP_THRESHOLD_' not in __import__('os').environ  # restored in this process


@pytest.mark.parametrize('argv, message', [
    (['--smoke', '--in-process', '--cases', 'nope'], 'cases must be drawn from'),
    (['--in-process', '--img-size', '32', '224', '--batch-size', '4', '4', '4'], 'one per image size'),
    (['--in-process', '--img-size', '32', '--repeats', '0'], 'repeats must be an int >= 1'),
])
def test_bad_arguments(argv, message, tmp_path):
    out = tmp_path / 'x.json'
    with pytest.raises(ValueError, match=message):
        bm.main(argv + ['--out', str(out)])
    assert not out.exists()  # nothing half-written


def test_without_deepinv_rows_say_not_installed(monkeypatch):
    # sys.modules[name] = None makes `import deepinv` raise ImportError, as when it is absent.
    monkeypatch.setitem(__import__('sys').modules, 'deepinv', None)
    monkeypatch.setitem(__import__('sys').modules, 'deepinv.models', None)
    spec = dict(case='drunet', img_size=32, batch_size=2, device='cpu', model='gradresnet_tiny_joint',
                num_classes=10, repeats=1, warmup=0, jem_steps=1, jem_repeats=1, memory_steps=1, seed=0,
                channels_last=False, threads=1)
    (res,) = bm._time_group([spec])
    assert res['status'] == 'not installed' and 'pip install' in res['error']
    doc = {'config': {'repeats': 1, 'jem_repeats': 1, 'jem_steps': 1}, 'results': [res],
           'targets': bm.compute_targets([res])}
    assert '| DRUNet denoise (deepinv) | DRUNet | not installed |' in bm.render_markdown(doc)
