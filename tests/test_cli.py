"""Every command line: one name in --help and in errors, and bad paths refused in one line, before any work."""
import sys

import pytest
from safetensors.torch import save_file

import timm
from timm_joint import benchmark, cli, data, evaluate, hub, restore, sample, sweep
from timm_joint import train as train_joint
from timm_joint.cli import CONSOLE_SCRIPTS, choose_cpu_threads, program_name
from timm_joint.io import atomic_dir

TINY = ['--model', 'gradresnet_tiny_joint', '--model-kwargs', 'channels=[8,16]', 'layers=[1,1]',
        '--num-classes', '4', '--img-size', '16', '-j', '0', '--no-progress']


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
    """A data folder, a text file, a text file named like weights, real weights, a folder."""
    root = tmp_path_factory.mktemp('cli')
    qs = data.prepare_quickstart(root / 'qs', patch_size=16, train_per_class=8, val_per_class=2, short_side=96,
                                 images=('astronaut', 'brick', 'coffee', 'gravel'))
    (root / 'file.txt').write_text('not a folder\n')
    (root / 'x.safetensors').write_text('{"not": "weights"}\n')
    (root / 'x.txt').write_text('{"not": "weights"}\n')
    model = timm.create_model('gradresnet_tiny_joint', num_classes=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / 'w.safetensors'))
    (root / 'folder').mkdir()
    return {'root': root, 'data': str(qs), 'file': str(root / 'file.txt'), 'fake_st': str(root / 'x.safetensors'),
            'fake_txt': str(root / 'x.txt'), 'folder': str(root / 'folder')}


def _call(main, argv):
    """The exit status of a command's main (Accelerate's singletons reset after it)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return code


def _bad_calls(p):
    """(module, main, argv whose path is wrong)."""
    return [
        ('timm_joint.train', train_joint.cli, TINY + ['--data-dir', p['data'], '--output', p['file']]),
        ('timm_joint.evaluate', evaluate.main, ['--model', 'gradresnet_tiny_joint', '--out', p['file']]),
        ('timm_joint.hub', hub.main, ['publish', '--checkpoint', p['folder'], '--results', p['folder'],
                                      '--out', p['root'] / 'pub']),
        ('timm_joint.benchmark', benchmark.main, ['--out', p['folder']]),
        ('timm_joint.sweep', sweep.main, ['--output', p['file']]),
        ('timm_joint.data', data.main, ['quickstart', '--root', p['file']]),
        ('timm_joint.restore', restore.main, ['--models', 'gradresnet_tiny_joint', '--out', p['file']]),
        ('timm_joint.sample', sample.main, ['--model', 'gradresnet_tiny_joint', '--out', p['file']]),
    ]


@pytest.mark.parametrize('started_as', ['module', 'console_script'])
def test_help_and_errors_name_the_program_alike(started_as, paths, capsys, monkeypatch):
    for module, main, bad in _bad_calls(paths):
        script = CONSOLE_SCRIPTS.get(module)
        if started_as == 'console_script':
            if script is None:
                continue  # sweep and data have no console script
            monkeypatch.setattr(sys, 'argv', [f'/venv/bin/{script}'])
            expected = script
        else:
            monkeypatch.setattr(sys, 'argv', ['/venv/lib/site-packages/pytest/__main__.py'])
            expected = f'python -m {module}'
        assert program_name(module) == expected
        capsys.readouterr()
        assert _call(main, ['--help']) == 0, module
        assert capsys.readouterr().out.startswith(f'usage: {expected} '), module
        assert _call(main, bad) == 2, module
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f'{expected}: error: '), (module, err)


def test_train_joint_py_is_named_as_typed(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train_joint.py'])
    assert train_joint._program_name() == 'train_joint.py'
    assert program_name('timm_joint.evaluate') == 'python -m timm_joint.evaluate'


def _one_error_line(capsys, module):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'python -m {module}: error: '), err
    return err[0]


@pytest.mark.parametrize('case', ['fake_st', 'fake_txt'])
def test_a_text_file_is_no_checkpoint_whatever_its_name(case, paths, capsys, tmp_path):
    bad = paths[case]
    assert _call(evaluate.main, ['--model', 'gradresnet_tiny_joint', '--checkpoint', bad, '--data-dir', paths['data'],
                                 '--out', tmp_path / 'e', '--no-progress']) == 2
    line = _one_error_line(capsys, 'timm_joint.evaluate')
    assert f"checkpoint '{bad}' is not a weights file" in line and 'expected a safetensors file' in line
    assert _call(train_joint.cli, TINY + ['--data-dir', paths['data'], '--initial-checkpoint', bad,
                                          '--output', tmp_path / 'r']) == 2
    line = _one_error_line(capsys, 'timm_joint.train')
    assert f"--initial-checkpoint: checkpoint '{bad}' is not a weights file" in line
    assert not (tmp_path / 'e').exists() and not (tmp_path / 'r').exists()


@pytest.mark.parametrize('flag, value, message', [
    ('--resume', 'file', "--resume '{file}' is a file: expected a checkpoint folder runs/NAME/checkpoints/step_"),
    ('--resume', 'missing', "--resume '{missing}' does not exist: expected a checkpoint folder"),
    ('--output', 'file', "--output '{file}' is a file: expected a folder to write into"),
    ('--output', 'under_file', "--output '{under_file}' lies under '{file}', which is a file"),
    ('--data-dir', 'file', "data folder '{file}' is a file: expected a folder (class subfolders of images"),
])
def test_train_refuses_a_file_where_a_folder_is_expected(flag, value, message, paths, capsys, tmp_path):
    values = dict(paths, missing=str(tmp_path / 'nope'), under_file=paths['file'] + '/runs')
    argv = TINY + ['--data-dir', paths['data'], '--output', tmp_path / 'runs', '--experiment', 'e']
    argv += [flag, values[value]]
    assert _call(train_joint.cli, argv) == 2
    assert message.format(**values) in _one_error_line(capsys, 'timm_joint.train')
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('flag, message', [
    ('--out', "--out '{file}' is a file: expected a folder to write into"),
    ('--data-dir', "data folder '{file}' is a file: expected a folder"),
])
def test_evaluate_refuses_a_file_where_a_folder_is_expected(flag, message, paths, capsys, tmp_path):
    argv = ['--model', 'gradresnet_tiny_joint', '--checkpoint', paths['root'] / 'w.safetensors', '--num-classes', '4',
            '--data-dir', paths['data'], '--out', tmp_path / 'e', '--no-progress', flag, paths['file']]
    assert _call(evaluate.main, argv) == 2
    assert message.format(**paths) in _one_error_line(capsys, 'timm_joint.evaluate')


def test_hub_refuses_a_file_for_a_checkpoint_folder_and_a_folder_for_results(paths, capsys, tmp_path):
    argv = ['publish', '--checkpoint', paths['file'], '--results', paths['folder'], '--out', tmp_path / 'pub']
    assert _call(hub.main, argv) == 2
    assert "results file '{folder}' is a folder: expected the results.json".format(**paths) in _one_error_line(
        capsys, 'timm_joint.hub')
    with pytest.raises(ValueError, match='is a file: expected an export folder'):
        hub.load_export(paths['file'])


def test_data_never_replaces_a_file_with_a_folder(paths, capsys):
    assert _call(data.main, ['digits', '--root', paths['file']]) == 2
    assert "--root '{file}' is a file: expected a folder to write into".format(**paths) in _one_error_line(
        capsys, 'timm_joint.data')
    with pytest.raises(ValueError, match='is a file: expected a folder'):
        with atomic_dir(paths['file']):
            pass
    assert open(paths['file']).read() == 'not a folder\n'


def test_error_line_is_one_line():
    assert cli.error_line('timm_joint.train', ValueError('a\nb')) == 'python -m timm_joint.train: error: a b'


# -- CPU threads -------------------------------------------------------------------------------------

@pytest.mark.parametrize('requested, env, cores, load, default, expected', [
    (None, '', 2, 1.9, 2, 1),     # a shared 2-core machine, one core busy: one thread
    (None, '', 2, 0.1, 2, 2),     # idle: torch's default
    (None, '', 16, 3.2, 8, 8),    # many idle cores: at most torch's default
    (None, '', 4, 7.0, 4, 1),     # overloaded: at least one
    (None, '3', 2, 1.9, 2, 3),    # OMP_NUM_THREADS wins
    (2, '3', 2, 1.9, 2, 2),       # --threads wins over everything
])
def test_cpu_threads_leave_busy_cores_alone(requested, env, cores, load, default, expected):
    threads, reason = choose_cpu_threads(requested, env=env, cores=cores, load=load, default=default)
    assert threads == expected and reason
    if expected < default and not env and not requested:
        assert 'stall' in reason and f'load average {load:.1f}' in reason


def test_recorded_command_line_runs_again_in_a_shell():
    # command_line quotes for a POSIX shell: the shell splits the line back into the same arguments.
    import shlex
    from timm_joint.cli import command_line
    argv = ['--dataset', '', '--label', "joint (it's λ=100)", '--out', 'a b/$HOME', '--sigmas', '0', '25', 'back\\slash']
    line = command_line('timm_joint.evaluate', argv)
    assert shlex.split(line) == ['python', '-m', 'timm_joint.evaluate', *argv]
