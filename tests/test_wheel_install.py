"""A regular (non-editable) install works: the wheel trains, evaluates and publishes from another folder.

The wheel is built from a copy of this source tree (so the tree gets no build/ or egg-info), installed
without its dependencies into a fresh virtual environment that sees the system's packages (torch, timm
and friends), and every command then runs from a folder outside the source tree with PYTHONPATH cleared,
so only the installed files can be imported: the packaged recipe (``-c configs/quickstart.yaml``), the
card template and the console script must all come from the wheel.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build needs is in pyproject.toml; these are what it never needs (and may be large).
_NOT_COPIED = shutil.ignore_patterns('.git', '.pytest_cache', '__pycache__', '*.egg-info', 'build', 'dist',
                                     'runs', 'data', 'docs', '*.pyc')


def _run(cmd, *, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f'{" ".join(str(c) for c in cmd)} failed ({res.returncode}):\n' \
                                f'{res.stdout[-2000:]}\n{res.stderr[-4000:]}'
    return res


@pytest.fixture(scope='module')
def venv(tmp_path_factory) -> Path:
    """A virtual environment with this project's wheel installed (and the system's packages visible)."""
    tmp = tmp_path_factory.mktemp('wheel')
    src, dist, env_dir = tmp / 'src', tmp / 'dist', tmp / 'venv'
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    t0 = time.time()
    # No isolation and no index: the build uses the installed setuptools and downloads nothing.
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
          '-w', dist, src], cwd=tmp, env=env)
    [wheel] = dist.glob('timm_joint-*.whl')
    # Without pip of its own: the system's pip (visible through --system-site-packages) installs into it.
    _run([sys.executable, '-m', 'venv', '--without-pip', '--system-site-packages', env_dir], cwd=tmp, env=env)
    python = env_dir / 'bin' / 'python'
    _run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--force-reinstall', '-q', wheel],
         cwd=tmp, env=env)
    print(f'wheel built and installed in {time.time() - t0:.1f} s')
    return env_dir


def test_installed_wheel_trains_evaluates_and_publishes_from_another_folder(venv, tmp_path):
    from timm_joint.data import prepare_quickstart
    work = tmp_path / 'work'
    data = work / 'data'
    prepare_quickstart(data, patch_size=16, train_per_class=8, val_per_class=2, short_side=96,
                       images=('astronaut', 'brick', 'coffee'))
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    env.update(PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}', OMP_NUM_THREADS='1',
               HF_HUB_OFFLINE='1', MPLBACKEND='Agg')
    python = venv / 'bin' / 'python'

    # Only the installed package is importable (find_spec locates it without the cost of importing torch),
    # and it carries the card template and the recipes, which resource_dir() prefers to any other copy.
    origin = _run([python, '-c', 'import importlib.util; print(importlib.util.find_spec("timm_joint").origin)'],
                  cwd=work, env=env).stdout.strip().splitlines()[-1]
    package = Path(origin).resolve().parent
    site = next((venv / 'lib').glob('python*/site-packages')).resolve()
    assert package == site / 'timm_joint', f'timm_joint imported from {package}, not from the wheel in {site}'
    assert (package / 'hub_cards' / 'model_card.md').is_file() and (package / 'configs' / 'quickstart.yaml').is_file()

    t0 = time.time()
    # The console script, with the packaged recipe named as the README names it (there is no configs/ here).
    _run(['timm-joint-train', '-c', 'configs/quickstart.yaml', '--data-dir', data,
          '--model-kwargs', 'channels=[8,16]', 'layers=[1,1]', '--num-classes', '3', '--img-size', '16',
          '-b', '6', '--den-batch-size', '6', '--epochs', '1', '--max-steps', '2', '--val-psnr-sigmas', '25',
          '--output', 'runs', '--experiment', 'wheel', '-j', '0', '--no-progress'], cwd=work, env=env)
    export = work / 'runs' / 'wheel' / 'export' / 'last'
    assert (export / 'model.safetensors').is_file() and (export / 'config.json').is_file()
    assert (work / 'runs' / 'wheel' / 'summary.csv').is_file()
    t_train = time.time()

    _run([python, '-m', 'timm_joint.evaluate', '--model', f'local-dir:{export}', '--dataset', '', '--data-dir', data,
          '--sigmas', '0', '--psnr-sigmas', '25', '--eigen-k', '0', '--grid-images', '2', '--batch-size', '8',
          '--workers', '0', '--no-progress', '--out', 'eval'], cwd=work, env=env)
    results = json.loads((work / 'eval' / 'results.json').read_text())
    assert results['psnr']['blind']['25'] > 0
    t_eval = time.time()

    _run([python, '-m', 'timm_joint.hub', 'publish', '--checkpoint', export, '--results', 'eval/results.json',
          '--out', 'hub', '--repo-id', 'timm-joint/wheel-test'], cwd=work, env=env)
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert (work / 'hub' / name).is_file(), name
    card = (work / 'hub' / 'README.md').read_text()
    assert '$' not in card.split('```')[0], 'the card has unfilled template placeholders'
    template = (ROOT / 'hub_cards' / 'model_card.md').read_text()
    fixed = next(line for line in template.splitlines() if len(line) > 40 and '$' not in line)
    assert fixed in card                                        # rendered from the packaged template
    print(f'train {t_train - t0:.1f} s, evaluate {t_eval - t_train:.1f} s, publish {time.time() - t_eval:.1f} s')
