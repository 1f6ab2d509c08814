"""timm's own model tests (``tests/test_models.py`` from timm's source distribution) on every gradresnet* name.

The project's other tests re-implement some of timm's checks; this module runs timm's file itself, the
judge named in DESIGN §4, so that a change in timm's checks reaches this project the day timm is upgraded.

The source distribution of the installed timm version is fetched once with pip from the package index and
cached under pytest's cache folder (``.pytest_cache/d/timm-sdist``); the tests are skipped, with pip's
words, only when the index cannot be reached. timm's file runs in one subprocess (``pytest -p timm_joint``
imports this package before collection, so the names are registered) on the names matching
``gradresnet``, with the markers of timm's CI matrix plus ``forward``; its JUnit report is read back and
every (timm test, model) pair becomes one test here, which fails with timm's assertion message.
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import List

import pytest
import timm

import timm_joint  # noqa: F401  (registers the models)

TIMM_VERSION = version('timm')
MODEL_NAMES = timm.list_models('gradresnet*')
# timm's CI runs its file once per marker; 'forward' (a forward at the default size) is cheap here.
MARKERS = 'base or cfg or torchscript or features or fxforward or fxbackward or backward or forward'
# timm's per-model checks that apply to a GradResNet: each becomes one test per name below.
TIMM_CHECKS = (
    'test_model_forward',
    'test_model_backward',
    'test_model_default_cfgs',
    'test_model_forward_torchscript',
    'test_model_forward_features',
    'test_model_forward_fx',
    'test_model_backward_fx',
)


@dataclass
class TimmResult:
    """One test of timm's file as its JUnit report records it."""
    test_id: str               # e.g. 'test_model_backward[2-gradresnet18_joint]'
    outcome: str               # 'passed', 'failed', 'error' or 'skipped'
    message: str = ''

    @property
    def function(self) -> str:
        return self.test_id.split('[', 1)[0]


def _cache_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(config, 'cache', None)  # absent under -p no:cacheprovider: then a per-run folder
    return Path(cache.mkdir('timm-sdist')) if cache is not None else tmp_path_factory.mktemp('timm-sdist')


def _fetch_timm_tests(cache_dir: Path) -> Path:
    """The folder of timm's extracted sdist (tests/ and pyproject.toml) for the installed version.

    Downloads it with pip on first use; skips the calling test only if the package index is unreachable.
    """
    target = cache_dir / f'timm-{TIMM_VERSION}'
    if (target / 'tests' / 'test_models.py').is_file():
        return target
    download = cache_dir / 'download'
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
           f'timm=={TIMM_VERSION}', '--dest', str(download), '--disable-pip-version-check', '--quiet']
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f'the package index did not answer within 10 minutes: {" ".join(cmd[2:])}')
    out = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        # A reachable index always lists some timm version: "from versions: none" means none could be read.
        if 'from versions: none' in out or re.search(r'NewConnectionError|Max retries exceeded|'
                                                     r'Temporary failure in name resolution|'
                                                     r'Network is unreachable|ProxyError', out):
            said = next((line for line in out.splitlines() if line.startswith('ERROR')), out[-300:])
            pytest.skip(f'package index unreachable: cannot fetch the timm {TIMM_VERSION} source distribution '
                        f'(its tests/test_models.py); pip: {said}')
        pytest.fail(f'pip download of timm=={TIMM_VERSION} (source) failed:\n{out[-3000:]}')
    archives = sorted(download.glob(f'timm-{TIMM_VERSION}.tar.gz'))
    if not archives:
        pytest.fail(f'pip download succeeded but left no timm-{TIMM_VERSION}.tar.gz in {download}: '
                    f'{sorted(p.name for p in download.iterdir())}')
    prefix = f'timm-{TIMM_VERSION}/'
    partial = cache_dir / f'timm-{TIMM_VERSION}.partial'
    for stale in (partial, target):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    with tarfile.open(archives[0]) as tar:
        # Only the tests and the pytest configuration (its markers); the installed timm is the one tested.
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix + 'tests/') or m.name == prefix + 'pyproject.toml']
        tar.extractall(partial, members=members, filter='data')
    # Renamed into place complete, so an interrupted extraction is never taken for a cached one.
    os.replace(partial / f'timm-{TIMM_VERSION}', target)
    partial.rmdir()
    archives[0].unlink()
    return target


def _read_junit(path: Path) -> List[TimmResult]:
    results = []
    for case in ET.parse(path).getroot().iter('testcase'):
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in ('failure', 'error', 'skipped'):
                outcome = {'failure': 'failed'}.get(child.tag, child.tag)
                message = child.get('message') or ''
                if not message and (child.text or '').strip():
                    message = child.text.strip().splitlines()[-1]
                # timm's assertion line and pytest's explanation; not the tensors pytest prints after them
                message = '\n    '.join(message.splitlines()[:2])[:600]
                break
        results.append(TimmResult(case.get('name'), outcome, message))
    return results


@pytest.fixture(scope='session')
def timm_results(pytestconfig, tmp_path_factory) -> List[TimmResult]:
    """Run timm's tests/test_models.py on the gradresnet* names once per session; its per-test results."""
    sdist = _fetch_timm_tests(_cache_dir(pytestconfig, tmp_path_factory))
    report = tmp_path_factory.mktemp('timm-suite') / 'junit.xml'
    env = {k: v for k, v in os.environ.items() if k != 'PYTEST_ADDOPTS'}
    env.setdefault('OMP_NUM_THREADS', '1')  # small models on a shared CPU: one thread is fastest
    cmd = [sys.executable, '-m', 'pytest', 'tests/test_models.py',
           '-c', 'pyproject.toml', '--rootdir', '.',       # timm's pytest config (markers), not this project's
           '-p', 'timm_joint',                             # imported before collection: registers the names
           '-p', 'no:cacheprovider', '-q', '-rN', '--junitxml', str(report),
           '-k', 'gradresnet', '-m', MARKERS, '-W', 'ignore::pytest.PytestUnknownMarkWarning']
    t0 = time.time()
    res = subprocess.run(cmd, cwd=sdist, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.time() - t0
    # pytest exit codes: 0 all passed, 1 some failed; anything else (usage, collection, internal error,
    # nothing collected) means timm's file did not run as intended.
    if res.returncode not in (0, 1) or not report.is_file():
        pytest.fail(f'timm {TIMM_VERSION} tests/test_models.py did not run (exit {res.returncode}, '
                    f'{elapsed:.0f} s):\n{(res.stdout + res.stderr)[-4000:]}')
    results = _read_junit(report)
    print(f'timm {TIMM_VERSION} test_models.py: {len(results)} tests on {MODEL_NAMES} in {elapsed:.1f} s')
    return results


def _for_model(results: List[TimmResult], function: str, model_name: str) -> List[TimmResult]:
    """Results of one timm test function whose model parameter is ``model_name`` (with or without a tag)."""
    pattern = re.compile(rf'[\[-]{re.escape(model_name)}(\.[\w]+)?[\]-]')
    return [r for r in results if r.function == function and pattern.search(r.test_id)]


def _summary(results: List[TimmResult]) -> str:
    return '\n'.join(f'  {r.test_id}: {r.outcome}: {r.message}' for r in results)


@pytest.mark.parametrize('check, model_name', [pytest.param(check, name, id=f'{check}-{name}')
                                                for check in TIMM_CHECKS for name in MODEL_NAMES])
def test_timm_model_check(check: str, model_name: str, timm_results: List[TimmResult]):
    runs = _for_model(timm_results, check, model_name)
    if not runs:
        ran = sorted({r.function for r in timm_results})
        pytest.fail(f'timm {TIMM_VERSION} {check} did not run on {model_name} (timm ran {ran} on '
                    f'{len(timm_results)} cases)')
    bad = [r for r in runs if r.outcome in ('failed', 'error')]
    if bad:
        pytest.fail(f'timm {TIMM_VERSION} {check} failed on {model_name}:\n{_summary(bad)}', pytrace=False)


def test_every_other_timm_test_on_these_names_passes(timm_results: List[TimmResult]):
    """Tests of timm's file outside TIMM_CHECKS that select a gradresnet name (a check a new timm adds)."""
    assert timm_results, 'timm selected no test for the gradresnet names'
    others = [r for r in timm_results if r.function not in TIMM_CHECKS and r.outcome in ('failed', 'error')]
    if others:
        pytest.fail(f'timm {TIMM_VERSION} tests failed on the gradresnet names:\n{_summary(others)}',
                    pytrace=False)
