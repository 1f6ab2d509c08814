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
