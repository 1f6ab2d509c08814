"""The (epsilon x sigma) PGD grid: exact on a linear classifier, consistent with plain noisy accuracy."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_joint  # noqa: F401  (registers the models)
from timm_joint.robustness import fixed_eval_noise, noisy_accuracy, robust_accuracy_grid

SHAPE = (3, 4, 4)


class TwoClassLinear(nn.Module):
    """logits [m, -m] with m(x) = w . (x - 0.5): deliberately non-robust, with known margins."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer('w', w.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x.flatten(1) - 0.5) @ self.w.to(x)
        return torch.stack([m, -m], dim=1)


def _linear_problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    wf = w.flatten()
    # |margin| as a multiple of the Linf 8/255 budget (8/255 * ||w||_1): half the images above 1.
    ratios = torch.tensor([0.3, 0.6, 1.6, 2.5, 4.0, 0.45, 3.0, 0.8], dtype=torch.float64)
    signs = torch.tensor([1, -1, 1, -1, 1, -1, 1, -1], dtype=torch.float64)
    margins = signs * ratios * (8 / 255) * wf.abs().sum()
    x = 0.5 + margins[:, None] * wf[None] / wf.dot(wf)
    x = x.view(-1, *SHAPE)
    assert float(x.min()) > 0.05 and float(x.max()) < 0.95  # the box never binds for these radii
    labels = (signs < 0).long()
    return TwoClassLinear(w), x, labels, list(range(100, 108))


def _predicted(model, x, labels, indices, sigma, eps, dual_norm):
    """Robust accuracy (%) of a linear classifier, in closed form: margin > eps * ||w||_dual."""
    noise = fixed_eval_noise(indices, SHAPE, seed=0).double()
    m = ((x + sigma * noise).flatten(1) - 0.5) @ model.w
    sign = 1 - 2 * labels.double()
    signed = sign * m
    if eps > 0:
        ratio = signed / (eps * dual_norm)
        assert not bool(((ratio - 1).abs() < 0.02).any()), 'a margin sits at the threshold: the check would be fragile'
    return 100. * float((signed > eps * dual_norm).double().mean())


@pytest.mark.parametrize('sigma', [0.0, 0.2])
def test_pgd_matches_closed_form_on_linear_classifier(sigma):
    model, x, labels, idx = _linear_problem()
    eps = {'linf': [0., 3 / 255, 8 / 255, 10 / 255], 'l2': [0., 0.2, 0.6]}
    grid = robust_accuracy_grid(model, x, labels, idx, epsilons=eps, sigmas=[sigma], steps=10,
                                random_start=False, batch_size=5)
    key = f'{sigma * 255:g}'
    norms = {'linf': float(model.w.abs().sum()), 'l2': float(model.w.norm())}
    for attack, keys in (('linf', ['0', '3', '8', '10']), ('l2', ['0', '0.2', '0.6'])):
        got = [grid[attack][key][k] for k in keys]
        want = [_predicted(model, x, labels, idx, sigma, e, norms[attack]) for e in eps[attack]]
        assert got == pytest.approx(want), (attack, got, want)
    # Each attack lowers the accuracy of this non-robust model.
    assert grid['linf'][key]['8'] < grid['linf'][key]['0']
    assert grid['l2'][key]['0.6'] < grid['l2'][key]['0']


def test_grid_at_epsilon_zero_equals_noisy_accuracy():
    torch.manual_seed(0)
    model = timm.create_model('gradresnet_tiny_joint', num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 16, 16, generator=g)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = torch.where(torch.arange(6) % 2 == 0, pred, (pred + 1) % 10)  # half right at sigma 0
    idx = [3, 9, 11, 20, 21, 40]
    sigmas = [0., 25 / 255, 100 / 255]
    grid = robust_accuracy_grid(model, x, labels, idx, epsilons={'linf': [0.], 'l2': [0.]}, sigmas=sigmas,
                                steps=1, batch_size=4)
    for sigma in sigmas:
        direct = noisy_accuracy(model, x, labels, idx, sigma=sigma, batch_size=5)
        key = f'{sigma * 255:g}'
        assert grid['linf'][key]['0'] == pytest.approx(direct)
        assert grid['l2'][key]['0'] == pytest.approx(direct)
    assert grid['linf']['0']['0'] == pytest.approx(50.0)


def test_grid_is_reproducible_and_includes_robustbench_thresholds():
    model, x, labels, idx = _linear_problem()
    kwargs = dict(epsilons={'linf': [0., 4 / 255], 'l2': [0.]}, sigmas=[0.02], steps=3)
    a = robust_accuracy_grid(model, x, labels, idx, **kwargs)
    b = robust_accuracy_grid(model, x, labels, idx, **kwargs)
    assert a == b
    assert set(a['linf']['5.1']) == {'0', '4', '8'}
    assert set(a['l2']['5.1']) == {'0', '0.5'}


class _Exploding(nn.Module):
    def forward(self, x):
        raise AssertionError('the model must not run on bad input')


@pytest.mark.parametrize('kwargs, match', [
    (dict(epsilons={'linf': [-1 / 255]}), 'linf epsilons'),
    (dict(sigmas=[0.1, -0.1]), 'sigmas'),
    (dict(attacks=('linf', 'l1')), 'attacks'),
])
def test_bad_input_fails_before_any_work(kwargs, match):
    x = torch.rand(2, *SHAPE)
    with pytest.raises(ValueError, match=match):
        robust_accuracy_grid(_Exploding(), x, torch.zeros(2, dtype=torch.long), [0, 1], **kwargs)
