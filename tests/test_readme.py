"""The README's usage example runs as written, offline."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / 'README.md'


def _usage_block() -> str:
    text = README.read_text()
    section = text.split('## Usage', 1)[1]
    match = re.search(r'```python\n(.*?)```', section, re.S)
    assert match, 'README has no python block under ## Usage'
    return match.group(1)


def test_readme_usage_example_runs_and_its_shapes_hold():
    code = _usage_block()
    scope: dict = {}
    exec(compile(code, 'README.md#usage', 'exec'), scope)
    y, x_hat, x_hat_c = scope['y'], scope['x_hat'], scope['x_hat_c']
    assert scope['logits'].shape == (4, 10)
    assert x_hat.shape == y.shape and x_hat_c.shape == y.shape
    assert scope['energy'].shape == (4,) and bool((scope['energy'] >= 0).all())
    # eq. 9 ties the example's outputs together: D(y, c) - D(y) = sigma^2 grad log p(c | y)
    model, c = scope['model'], scope['logits'].argmax(-1)
    g = model.adversarial_gradient(y, c=c)
    torch.testing.assert_close(x_hat_c - x_hat, (25 / 255) ** 2 * g, rtol=1e-3, atol=1e-6)


def test_readme_models_table_is_what_the_models_command_prints():
    # Path 1: the table in the README. Path 2: `python -m timm_joint.models`, run as a user would.
    import os
    import subprocess
    import sys
    section = README.read_text().split('## Models', 1)[1].split('\n## ', 1)[0]
    in_readme = [line for line in section.splitlines() if line.startswith('|')]
    out = subprocess.run([sys.executable, '-m', 'timm_joint.models'], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1')).stdout
    printed = [line for line in out.splitlines() if line.startswith('|')]
    assert len(printed) >= 6  # header, rule and one row per registered GradResNet
    assert in_readme == printed


def test_readme_is_a_front_page():
    # The README stays a front page; tables, the method and references live in docs/.
    text = README.read_text()
    assert len(text) <= 10_000, len(text)
    for doc in ('method', 'training', 'evaluation', 'experiments', 'performance', 'prior'):
        assert f'docs/{doc}.md' in text and (README.parent / 'docs' / f'{doc}.md').is_file(), doc
