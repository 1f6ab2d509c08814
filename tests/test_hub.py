"""Publishing to, and loading back from, the Hugging Face Hub layout; all offline.

A tiny GradResNet with perturbed weights is exported with ``save_pretrained``, published with
``timm_joint.hub.publish`` and loaded back through timm's own loaders (``local-dir:``, ``hf-hub:``
and the registered name, the last two from a Hugging Face cache laid out on disk as
huggingface_hub lays it, in a subprocess with ``HF_HUB_OFFLINE=1``). Outputs must be bit-equal.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import timm
import timm_joint
from conftest import malicious_pickle
from timm_joint import hub
from timm_joint.hub import publish, results_table, save_pretrained
from timm_joint.io import load_model

ARCH = 'gradresnet_tiny_joint'
REGISTERED_ID = f'{timm_joint.HF_HUB_ORG}/{ARCH}.cifar10'  # what default_cfgs point at
FAKE_TOKEN = 'hf_' + 'TestTokenNeverToBeWritten0123456789'


def _results(**overrides):
    """A results.json as the evaluation writes it; the numbers are arbitrary, not measurements."""
    results = {
        'schema_version': 1,
        'model': {'name': ARCH, 'checkpoint': 'runs/tiny/export/best', 'architecture': ARCH},
        'dataset': {'name': 'torch/cifar10', 'split': 'test', 'num_images': 128},
        'units': {'sigma': '0-255', 'accuracy': '% top-1', 'ece': '%', 'psnr': 'dB', 'auroc': '[0, 1]'},
        'accuracy': {'0': 61.71875, '25': 48.4375, '100': 12.5},
        'psnr': {
            'blind': {'15': 27.123456, '25': 24.5, '5': 33.25},
            'cond_true': {'25': 24.75, '15': 'n/a'},  # the evaluation writes 'n/a' where it cannot measure
            'cond_pred': {'25': 'n/a'},
        },
        'ece': {'0': 4.21},
        'command': 'python -m timm_joint.evaluate --model gradresnet_tiny_joint --checkpoint runs/tiny/export/best',
        'ood': {'dataset': 'torch/svhn', 'auroc': {'neg_energy': 0.875, 'max_softmax': 'n/a'}},
    }
    results.update(overrides)
    return results


def _trained_tiny(num_classes: int, seed: int) -> torch.nn.Module:
    """A tiny GradResNet whose weights are not any initialisation (perturbed, then two SGD steps)."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(4, 3, 16, 16)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4) % num_classes) + model.energy(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 31, 37, generator=g)  # odd sizes, batch 3


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x), model.denoise(x)


def _export(model, run_dir: Path, num_classes: int, args_yaml: str = None) -> Path:
    export = save_pretrained(model, run_dir / 'export' / 'best', model_name=ARCH,
                             model_args=dict(num_classes=num_classes))
    if args_yaml is not None:
        (run_dir / 'args.yaml').write_text(args_yaml)
    return export


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A 4-class model exported, evaluated (stand-in results) and published to a folder."""
    root = tmp_path_factory.mktemp('hub')
    model = _trained_tiny(num_classes=4, seed=1)
    export = _export(model, root / 'runs' / 'tiny', 4, args_yaml=(
        'config: configs/cifar10_joint.yaml\nlr: 0.001\nhub_token: should-be-dropped\n'))
    results_path = root / 'results.json'
    results_path.write_text(json.dumps(_results()))
    out = publish(export, results_path, root / 'out', repo_id='someone/gradresnet-tiny-test')
    return dict(root=root, model=model, export=export, results=results_path, out=out)


def _front_matter(card: str) -> dict:
    m = re.match(r'^---\n(.*?)\n---\n', card, re.S)
    assert m, 'card has no YAML front matter'
    return yaml.safe_load(m.group(1))


# -- publish and local-dir ------------------------------------------------------------------------

def test_published_folder_holds_exactly_the_exported_weights(published):
    out = published['out']
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    tensors = load_file(str(out / 'model.safetensors'))
    state = published['model'].state_dict()
    assert sorted(tensors) == sorted(state)
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 4
    assert config['model_args']['num_classes'] == 4


def test_local_dir_gives_bit_equal_outputs(published):
    x = _inputs()
    ref_logits, ref_den = _outputs(published['model'], x)
    loaded = timm.create_model(f"local-dir:{published['out']}", pretrained=True)
    logits, den = _outputs(loaded, x)
    assert logits.shape == (3, 4)
    assert torch.equal(logits, ref_logits) and torch.equal(den, ref_den)
    helper_logits, helper_den = _outputs(load_model(published['out'])[0], x)
    assert torch.equal(helper_logits, ref_logits) and torch.equal(helper_den, ref_den)
    # The comparison can fail: a model that did not get the weights gives other outputs.
    fresh_logits, _ = _outputs(timm.create_model(ARCH, num_classes=4), x)
    assert not torch.equal(fresh_logits, ref_logits)


# -- the card -------------------------------------------------------------------------------------

def test_card_front_matter_parses_and_metrics_equal_results(published):
    results = json.loads(published['results'].read_text())
    fm = _front_matter((published['out'] / 'README.md').read_text())
    assert fm['library_name'] == 'timm'
    assert fm['pipeline_tag'] == 'image-classification'
    assert fm['license'] and fm['datasets'] and 'timm' in fm['tags']
    (index,) = fm['model-index']
    found = {}
    for block in index['results']:
        assert block['dataset']['split'] == results['dataset']['split']
        for metric in block['metrics']:
            m = re.fullmatch(r'(Top-1 accuracy|PSNR (\w+)), sigma=(\d+)/255', metric['name'])
            assert m, metric['name']
            kind = 'accuracy' if m.group(2) is None else m.group(2)
            found[(kind, m.group(3))] = metric['value']
    expected = {('accuracy', k): v for k, v in results['accuracy'].items()}
    for variant, table in results['psnr'].items():
        expected.update({(variant, k): v for k, v in table.items() if v != 'n/a'})
    assert found == expected  # every measured number, exactly, and nothing else ('n/a' is not a metric)


def test_card_body_recipe_citation_and_no_secret_key(published):
    card = (published['out'] / 'README.md').read_text()
    assert 'Command: `python train_joint.py -c configs/cifar10_joint.yaml`' in card
    assert 'lr: 0.001' in card
    assert f"Evaluation command: `{_results()['command']}`" in card
    assert 'hub_token' not in card and 'should-be-dropped' not in card
    assert "timm.create_model('hf-hub:someone/gradresnet-tiny-test', pretrained=True)" in card
    assert 'model.denoise(y)' in card and 'model.denoise(y, sigma=sigma, c=' in card
    assert 'arXiv:2410.03505' in card and 'Thiry' in card and 'Guth' in card
    # The usage example's noise level is one the card reports, not a typed number.
    (level,) = re.findall(r'^sigma = (\d+) / 255', card, re.M)
    assert level in _results()['psnr']['blind']
    assert results_table(json.loads(published['results'].read_text())) in card
    # The other sections' numbers, by key path, with results.json's units; 'n/a' is left out.
    assert '| `ece.0` | 4.21 | % |' in card and '| `ood.auroc.neg_energy` | 0.875 | [0, 1] |' in card
    assert 'max_softmax' not in card


def test_card_says_not_recorded_without_training_args(tmp_path):
    export = save_pretrained(_trained_tiny(4, seed=2), tmp_path / 'runs' / 'norec' / 'export' / 'best',
                             model_name=ARCH, model_args=dict(num_classes=4),
                             extra_config={'timm_joint': {'task': 'joint', 'lambda_den': 0.375}})
    out = publish(export, _results(), tmp_path / 'out', repo_id='someone/x')
    training = (out / 'README.md').read_text().split('## Training')[1]
    assert 'Command: `not recorded`' in training and 'Training arguments: not recorded' in training
    assert 'lambda_den: 0.375' in training  # what the export itself records about the objective


def test_results_table_rows_from_the_dict():
    results = _results()
    lines = results_table(results).splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    # cond_pred holds no number at all: no column for it.
    assert header == ['sigma (0-255)', 'Top-1 (%)', 'PSNR blind (dB)', 'PSNR cond. true class (dB)']
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
    # Numeric order of noise levels, not string order ('100' < '15' as strings).
    assert [r[0] for r in rows] == ['0', '5', '15', '25', '100']
    tables = [results['accuracy'], results['psnr']['blind'], results['psnr']['cond_true']]
    for row in rows:
        for cell, table in zip(row[1:], tables):
            if row[0] not in table:
                assert cell == '-'
            elif table[row[0]] == 'n/a':
                assert cell == 'n/a'
            else:
                assert float(cell) == round(table[row[0]], 2)


@pytest.mark.parametrize('drop', ['schema_version', 'model.name', 'dataset.split', 'dataset.num_images',
                                  'accuracy', 'psnr', 'psnr.blind'])
def test_missing_results_key_is_named(drop):
    results = json.loads(json.dumps(_results()))
    parent, _, key = drop.rpartition('.')
    (results[parent] if parent else results).pop(key)
    with pytest.raises(ValueError, match=re.escape(f"'{drop}'")):
        hub.validate_results(results)


def test_bad_results_values_are_refused():
    with pytest.raises(ValueError, match='noise level'):
        hub.validate_results(_results(accuracy={'clean': 90.0}))
    with pytest.raises(ValueError, match='percent'):
        hub.validate_results(_results(accuracy={'0': 0.9 * 120}))
    with pytest.raises(ValueError, match="'psnr.blind.25'"):
        hub.validate_results(_results(psnr={'blind': {'25': float('nan')}}))
    with pytest.raises(ValueError, match='no measured value'):
        hub.validate_results(_results(psnr={'blind': {'25': 'n/a'}}))
    with pytest.raises(ValueError, match="'accuracy.25'"):
        hub.validate_results(_results(accuracy={'25': 'n/a'}))


def test_image_folder_results_need_an_explicit_repo_id(published, tmp_path):
    results = _results(dataset={'name': '', 'split': 'validation', 'num_images': 40})
    with pytest.raises(ValueError, match='--repo-id'):
        publish(published['export'], results, tmp_path / 'a')
    out = publish(published['export'], results, tmp_path / 'b', repo_id='someone/quickstart')
    fm = _front_matter((out / 'README.md').read_text())
    assert fm['datasets'] == [] and 'an image folder' in (out / 'README.md').read_text()


# -- refusal to overwrite, atomicity, CLI errors --------------------------------------------------

def test_refuses_non_empty_out_unless_overwrite(published, tmp_path, capsys):
    out = tmp_path / 'taken'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    argv = ['publish', '--checkpoint', str(published['export']), '--results', str(published['results']),
            '--out', str(out)]
    assert hub.main(argv) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert (out / 'keep.txt').read_text() == 'mine'
    assert hub.main(argv + ['--overwrite']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    with pytest.raises(ValueError, match='checkpoint folder'):
        publish(published['export'], published['results'], published['export'], overwrite=True)


def test_failed_publish_leaves_nothing(published, tmp_path):
    bad = tmp_path / 'bad_card.md'
    bad.write_text('---\n$front_matter---\n$no_such_placeholder\n')
    dest = tmp_path / 'dest'
    with pytest.raises(ValueError, match='placeholder'):
        publish(published['export'], published['results'], dest, template=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad_card.md']


def test_cli_names_missing_results_key(published, tmp_path, capsys):
    results = _results()
    del results['psnr']['blind']
    path = tmp_path / 'results.json'
    path.write_text(json.dumps(results))
    rc = hub.main(['publish', '--checkpoint', str(published['export']), '--results', str(path),
                   '--out', str(tmp_path / 'o')])
    assert rc == 2 and "'psnr.blind'" in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_results_for_another_model_are_refused(published, tmp_path):
    with pytest.raises(ValueError, match='gradresnet18_joint'):
        publish(published['export'], _results(model={'name': 'gradresnet18_joint'}), tmp_path / 'o')
    with pytest.raises(ValueError, match='architecture'):
        publish(published['export'], _results(model={'name': 'local-dir:x', 'architecture': 'gradresnet10_joint'}),
                tmp_path / 'o')
    assert not (tmp_path / 'o').exists()


# -- tokens and push ------------------------------------------------------------------------------

class _RecordingHfApi:
    """Stands in for huggingface_hub.HfApi (there is no Hub here): records every call."""
    calls = []
    repo_is_private = True

    def __init__(self, **kwargs):
        self.calls.append(('__init__', kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', dict(kwargs, repo_id=repo_id)))

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(('repo_info', dict(kwargs, repo_id=repo_id)))
        return type('Info', (), {'private': self.repo_is_private})()

    def upload_folder(self, **kwargs):
        folder = Path(kwargs['folder_path'])
        # What would leave the machine, read at the moment of the call.
        snapshot = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in folder.rglob('*') if p.is_file()}
        self.calls.append(('upload_folder', dict(kwargs, snapshot=snapshot)))
        return type('Commit', (), {'commit_url': f"https://hub.invalid/{kwargs['repo_id']}/commit/0"})()


@pytest.fixture
def recorder(monkeypatch):
    _RecordingHfApi.calls = []
    _RecordingHfApi.repo_is_private = True
    monkeypatch.setattr(hub, 'HfApi', _RecordingHfApi)
    return _RecordingHfApi


def test_push_creates_repo_and_uploads_exactly_the_folder(published, tmp_path, recorder, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    out = tmp_path / 'pub'
    rc = hub.main(['publish', '--checkpoint', str(published['export']), '--results', str(published['results']),
                   '--out', str(out), '--push', '--repo-id', 'someone/tiny', '--private',
                   '--commit-message', 'first weights'])
    assert rc == 0
    names = [name for name, _ in recorder.calls]
    assert names == ['__init__', 'create_repo', 'repo_info', 'upload_folder']
    init, create, _, upload = (kw for _, kw in recorder.calls)
    # No token handed over: huggingface_hub finds HF_TOKEN (or the login) itself.
    assert init.get('token') is None
    assert create['repo_id'] == 'someone/tiny' and create['private'] is True and create['exist_ok'] is True
    assert upload['repo_id'] == 'someone/tiny' and upload['commit_message'] == 'first weights'
    assert Path(upload['folder_path']) == out
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert upload['snapshot'] == on_disk
    assert sorted(on_disk) == ['README.md', 'config.json', 'model.safetensors']
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    assert not any(FAKE_TOKEN.encode() in p.read_bytes() for p in out.iterdir())


def test_explicit_token_goes_only_to_huggingface_hub(published, recorder, capsys):
    hub.push_to_hub(published['out'], 'someone/tiny', token=FAKE_TOKEN)
    init = recorder.calls[0][1]
    assert init['token'] == FAKE_TOKEN
    later = json.dumps([kw for _, kw in recorder.calls[1:]], default=str)
    assert FAKE_TOKEN not in later
    create = recorder.calls[1][1]
    assert create['private'] is False  # public unless asked
    assert 'repo_info' not in [name for name, _ in recorder.calls]
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err


def test_private_push_into_public_repo_is_refused(published, recorder):
    recorder.repo_is_private = False
    with pytest.raises(RuntimeError, match='public'):
        hub.push_to_hub(published['out'], 'someone/tiny', private=True)
    assert 'upload_folder' not in [name for name, _ in recorder.calls]


def test_dry_run_and_failed_upload_in_process(published, tmp_path, recorder, monkeypatch, capsys):
    base = ['publish', '--checkpoint', str(published['export']), '--results', str(published['results']),
            '--push', '--repo-id', 'someone/tiny']
    assert hub.main(base + ['--out', str(tmp_path / 'a'), '--dry-run']) == 0
    assert recorder.calls == []  # a dry run constructs no client, creates no repo, uploads nothing

    def refuse(self, repo_id, **kwargs):
        raise OSError('no route to the Hub')
    monkeypatch.setattr(recorder, 'create_repo', refuse)
    assert hub.main(base + ['--out', str(tmp_path / 'b')]) == 1
    assert 'no route to the Hub' in capsys.readouterr().err
    assert 'upload_folder' not in [name for name, _ in recorder.calls]
    assert (tmp_path / 'b' / 'model.safetensors').is_file()  # the folder stays for a retry


def test_token_in_training_args_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    export = _export(_trained_tiny(4, seed=3), tmp_path / 'runs' / 'leak', 4,
                     args_yaml=f'config: configs/cifar10_joint.yaml\nnote: {FAKE_TOKEN}\n')
    with pytest.raises(RuntimeError, match='token'):
        publish(export, _results(), tmp_path / 'out', repo_id='someone/x')
    assert not (tmp_path / 'out').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['runs']


def _same_threads() -> dict:
    # Bit-equality across processes needs the same reduction order: the child runs with this process's
    # thread count (the conftest sets one), or a conv's float sums may differ in the last bit.
    return {'OMP_NUM_THREADS': str(torch.get_num_threads())}


def _offline_env(hf_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE'))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE='1', GIT_PYTHON_REFRESH='quiet', **_same_threads(), **extra)
    return env


def test_dry_run_lists_plan_uploads_nothing_and_hides_token(published, tmp_path):
    out = tmp_path / 'dry'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_joint.hub', 'publish', '--checkpoint', str(published['export']),
         '--results', str(published['results']), '--out', str(out), '--push', '--repo-id', 'someone/tiny',
         '--dry-run', '--commit-message', 'dry message'],
        env=_offline_env(tmp_path / 'hf_home', HF_TOKEN=FAKE_TOKEN), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert FAKE_TOKEN not in text
    assert 'someone/tiny' in text and 'dry message' in text
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert name in text
    assert 'found by huggingface_hub (not shown)' in text
    assert not any(FAKE_TOKEN.encode() in p.read_bytes() for p in out.iterdir())


# -- the Hugging Face cache, offline, through timm's own loaders ----------------------------------

def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _lay_into_hf_cache(folder: Path, hf_home: Path, repo_id: str, commit: str) -> Path:
    """Place a folder as huggingface_hub's cache holds a downloaded repo.

    hub/models--ORG--NAME/{blobs/<etag>, refs/main (the commit), snapshots/<commit>/<file> -> blob};
    etags are the sha256 of LFS files (weights) and the git blob sha1 of the others.
    """
    repo_dir = hf_home / 'hub' / ('models--' + repo_id.replace('/', '--'))
    (repo_dir / 'blobs').mkdir(parents=True)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(commit)
    snap = repo_dir / 'snapshots' / commit
    snap.mkdir(parents=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        lfs = file.suffix in ('.safetensors', '.bin', '.pth')
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (repo_dir / 'blobs' / etag).write_bytes(data)
        (snap / file.name).symlink_to(Path('..') / '..' / 'blobs' / etag)
    return snap


_SUBPROCESS_LOAD = textwrap.dedent('''
    import json, sys
    import torch, timm, timm_joint
    from safetensors.torch import load_file, save_file
    x = load_file(sys.argv[1])['x']
    out, report = {}, {}
    for key, name in (('registered', 'gradresnet_tiny_joint.cifar10'),
                      ('default_tag', 'gradresnet_tiny_joint'),
                      ('hf_hub', 'hf-hub:timm-joint/gradresnet_tiny_joint.cifar10')):
        model = timm.create_model(name, pretrained=True).eval()
        with torch.no_grad():
            out[key + '.logits'], out[key + '.denoise'] = model(x), model.denoise(x)
    try:
        timm.create_model('hf-hub:timm-joint/evil', pretrained=True)
        report['evil'] = 'loaded'
    except Exception as e:
        report['evil'] = type(e).__name__ + ': ' + str(e)
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
    print(json.dumps(report))
''')


def test_registered_name_and_hf_hub_from_offline_cache_bit_equal(tmp_path):
    # A 10-class model: what the registered cfg 'gradresnet_tiny_joint.cifar10' describes.
    model = _trained_tiny(num_classes=10, seed=4)
    export = _export(model, tmp_path / 'runs' / 'c10', 10)
    out = publish(export, _results(), tmp_path / 'pub')  # default repo id: the registered one
    assert f"hf-hub:{REGISTERED_ID}" in (out / 'README.md').read_text()
    hf_home = tmp_path / 'hf_home'
    _lay_into_hf_cache(out, hf_home, REGISTERED_ID, commit='1' * 40)
    # A second repo whose only weights are a pickle that would create a file when loaded.
    evil = tmp_path / 'evil'
    evil.mkdir()
    (evil / 'config.json').write_bytes((out / 'config.json').read_bytes())
    sentinel = tmp_path / 'pwned_hub'
    malicious_pickle(evil / 'pytorch_model.bin', sentinel)
    _lay_into_hf_cache(evil, hf_home, 'timm-joint/evil', commit='2' * 40)

    x = _inputs()
    save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    script = tmp_path / 'load.py'
    script.write_text(_SUBPROCESS_LOAD)
    argv = [sys.executable, str(script), str(tmp_path / 'x.safetensors'), str(tmp_path / 'y.safetensors')]
    proc = subprocess.run(argv,
                          env=_offline_env(hf_home), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    got = load_file(str(tmp_path / 'y.safetensors'))
    ref_logits, ref_den = _outputs(model, x)
    for key in ('registered', 'default_tag', 'hf_hub'):
        assert torch.equal(got[key + '.logits'], ref_logits), key
        assert torch.equal(got[key + '.denoise'], ref_den), key
    assert 'weights_only' in report['evil'] and not sentinel.exists()


def test_offline_without_weights_names_repo_and_ways_out(tmp_path):
    code = textwrap.dedent('''
        import json, timm, timm_joint
        try:
            timm.create_model('gradresnet_tiny_joint', pretrained=True)
            print(json.dumps({'error': None}))
        except Exception as e:
            print(json.dumps({'error': type(e).__name__, 'message': str(e), 'runtime': isinstance(e, RuntimeError)}))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], env=_offline_env(tmp_path / 'empty_hf_home'),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['error'] == 'PretrainedUnavailableError' and report['runtime']  # timm's loaders raise RuntimeError
    assert REGISTERED_ID in report['message'] and 'HF_HUB_OFFLINE' in report['message']
    assert 'local-dir:' in report['message'] and 'train_joint.py' in report['message']


# -- safety: pickles that would run code ----------------------------------------------------------

def test_malicious_pickle_is_refused(published, tmp_path):
    # The payload is live: an unrestricted unpickler runs it (this is what weights_only=True prevents).
    control = tmp_path / 'control'
    malicious_pickle(tmp_path / 'control.bin', control)
    torch.load(str(tmp_path / 'control.bin'), weights_only=False)
    assert control.exists()

    sentinel = tmp_path / 'pwned'
    folder = tmp_path / 'evil_export'
    folder.mkdir()
    (folder / 'config.json').write_bytes((published['out'] / 'config.json').read_bytes())
    malicious_pickle(folder / 'pytorch_model.bin', sentinel)
    with pytest.raises(RuntimeError, match='weights_only'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    with pytest.raises(ValueError, match='refused'):
        load_model(folder)
    with pytest.raises(ValueError, match='refused'):
        hub.load_export(folder)
    with pytest.raises(ValueError, match='refused'):
        publish(folder, published['results'], tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    assert not sentinel.exists()


def test_plain_tensor_pickle_is_accepted_and_converted(published, tmp_path):
    # A .bin of plain tensors (what torch.save(model.state_dict()) writes) is fine: it becomes safetensors.
    folder = tmp_path / 'bin_export'
    folder.mkdir()
    (folder / 'config.json').write_bytes((published['out'] / 'config.json').read_bytes())
    torch.save(published['model'].state_dict(), str(folder / 'pytorch_model.bin'))
    out = publish(folder, published['results'], tmp_path / 'out', repo_id='someone/x')
    x = _inputs()
    ref = _outputs(published['model'], x)
    got = _outputs(timm.create_model(f'local-dir:{out}', pretrained=True), x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# -- a stand-in Hub over HTTP: unpublished tags fail at once, published ones download ------------

class _StandInHub:
    """A local HTTP server that answers as the Hugging Face Hub does for file downloads
    (``HEAD``/``GET /ORG/NAME/resolve/REVISION/FILE``): the files of published repos, 404 with
    ``X-Error-Code: EntryNotFound`` for a file a repo lacks, and 401 with ``RepoNotFound`` for
    a repo that does not exist (what the Hub tells an anonymous client). Every request is logged."""

    def __init__(self, repos):
        import http.server
        import threading
        self.repos = repos  # {repo_id: {filename: bytes}}
        self.requests = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self, status: int, code: str, message: str) -> None:
                # The Hub's error answer: a status and huggingface_hub's X-Error-* headers, no body.
                self.send_response(status)
                self.send_header('X-Error-Code', code)
                self.send_header('X-Error-Message', message)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def _answer(self, body: bool):
                stand_in.requests.append((self.command, self.path))
                parts = self.path.split('?')[0].strip('/').split('/')
                repo_id, filename = '/'.join(parts[:2]), '/'.join(parts[4:])
                files = stand_in.repos.get(repo_id)
                if len(parts) < 5 or parts[2] != 'resolve' or files is None:
                    return self._refuse(401, 'RepoNotFound', 'Repository not found')
                if filename not in files:
                    return self._refuse(404, 'EntryNotFound', 'Entry not found')
                data = files[filename]
                self.send_response(200)
                self.send_header('X-Repo-Commit', '3' * 40)
                self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _online_env(hf_home: Path, endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE'))}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY='1',
               GIT_PYTHON_REFRESH='quiet', NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost',
               **_same_threads())
    return env


_SUBPROCESS_PRETRAINED = textwrap.dedent('''
    import json, sys, time
    import torch, timm, timm_joint
    from safetensors.torch import load_file, save_file
    report = {}
    for key, name in (('unpublished', 'gradresnet10_joint'), ('published', 'gradresnet_tiny_joint')):
        t0 = time.time()
        try:
            model = timm.create_model(name, pretrained=True).eval()
            x = load_file(sys.argv[1])['x']
            with torch.no_grad():
                save_file({'logits': model(x).contiguous()}, sys.argv[2])
            report[key] = {'error': None}
        except Exception as e:
            report[key] = {'error': type(e).__name__, 'message': str(e), 'cause': repr(e.__cause__),
                           'context_shown': not e.__suppress_context__ and e.__context__ is not None}
        report[key]['seconds'] = time.time() - t0
    print(json.dumps(report))
''')


def test_pretrained_fails_at_once_when_unpublished_and_downloads_once_published(tmp_path):
    model = _trained_tiny(num_classes=10, seed=5)
    out = publish(_export(model, tmp_path / 'runs' / 'c10', 10), _results(), tmp_path / 'pub')
    stand_in = _StandInHub({REGISTERED_ID: {p.name: p.read_bytes() for p in out.iterdir()}})
    try:
        x = _inputs()
        save_file({'x': x}, str(tmp_path / 'x.safetensors'))
        script = tmp_path / 'pretrained.py'
        script.write_text(_SUBPROCESS_PRETRAINED)
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'x.safetensors'), str(tmp_path / 'y.safetensors')],
                              env=_online_env(tmp_path / 'hf_home', stand_in.url), capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    finally:
        stand_in.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    # Not published: one request, no retries, the one message with the repo and the ways out, nothing chained.
    bad = report['unpublished']
    unpublished = [r for r in stand_in.requests if 'gradresnet10_joint' in r[1]]
    assert len(unpublished) == 1, unpublished
    assert bad['error'] == 'PretrainedUnavailableError' and bad['cause'] == 'None' and not bad['context_shown']
    assert f'{timm_joint.HF_HUB_ORG}/gradresnet10_joint.cifar10' in bad['message']
    assert 'not published' in bad['message'] and 'local-dir:' in bad['message'] and 'train_joint.py' in bad['message']
    assert '\n' not in bad['message'] and bad['seconds'] < 30
    assert 'Retrying' not in proc.stderr

    # Published: downloaded through timm's loader from the stand-in Hub, bit-equal to the model.
    assert report['published']['error'] is None, report['published']
    assert any(r[0] == 'GET' and r[1].endswith('/model.safetensors') and 'gradresnet_tiny_joint' in r[1]
               for r in stand_in.requests)
    with torch.no_grad():
        ref_logits = model(x)
    assert torch.equal(load_file(str(tmp_path / 'y.safetensors'))['logits'], ref_logits)


def test_pretrained_with_an_unreachable_hub_fails_in_one_line(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    code = textwrap.dedent('''
        import json, time, timm, timm_joint
        t0 = time.time()
        try:
            timm.create_model('gradresnet_tiny_joint', pretrained=True)
            print(json.dumps({'error': None}))
        except Exception as e:
            print(json.dumps({'error': type(e).__name__, 'message': str(e), 'seconds': time.time() - t0,
                              'chained': e.__cause__ is not None or not e.__suppress_context__}))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], env=_online_env(tmp_path / 'hf_home', f'http://127.0.0.1:{port}'),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 'Retrying' not in proc.stderr and report['seconds'] < 30  # timm's download alone retried for a minute
    assert report['error'] == 'PretrainedUnavailableError' and not report['chained']
    assert 'could not reach the Hugging Face Hub' in report['message'] and REGISTERED_ID in report['message']
