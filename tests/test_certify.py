"""Certified robustness by randomized smoothing: each behaviour checked through a second code path.

- the Monte Carlo radius of a linear classifier against its closed form (the distance to the hyperplane);
- the Clopper-Pearson bound against scipy's ``binomtest(...).proportion_ci(method='exact')``;
- the abstain rules of ``certify`` and ``predict`` at their exact thresholds, with scripted base classifiers;
- batched sampling against a loop over samples; one seed twice against another seed;
- denoised smoothing against the model's own ``denoise`` called directly, and without a graph;
- ``certify_grid`` against ``Smooth.certify`` image by image; the command line against both.
"""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import yaml
from scipy.stats import binom, binomtest, norm

import timm_joint  # noqa: F401  (registers the models)
from timm_joint.robustness import (
    ABSTAIN, DenoisedClassifier, PHASE_ESTIMATE, PHASE_SELECT, Smooth, certified_accuracy, certified_accuracy_curve,
    certify_grid, check_certify_args, clopper_pearson_lower, max_certified_radius, min_certify_samples,
    smoothing_noise,
)
from conftest import make_small_gradresnet, rand_images

SHAPE = (3, 8, 8)


class LinearTwoClass(nn.Module):
    """logits [m, -m], m(x) = w . (x - 0.5): class 0 on one side of a hyperplane, class 1 on the other.

    Smoothed with N(0, sigma^2 I), class 0 has probability Phi(m(x) / (sigma ||w||)), so the smoothed
    classifier's exact certified radius is |m(x)| / ||w||, the distance to the hyperplane.
    """

    num_classes = 2

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer('w', w.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x.flatten(1) - 0.5) @ self.w.to(x)
        return torch.stack([m, -m], dim=1)


def _linear_images(distances, w: torch.Tensor) -> torch.Tensor:
    """Images at signed distances from the hyperplane (positive: class 0)."""
    u = w.flatten() / w.norm()
    return (0.5 + torch.as_tensor(distances, dtype=torch.float64)[:, None] * u[None]).view(-1, *SHAPE)


def _w(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Scripted(nn.Module):
    """A base classifier that returns a fixed sequence of classes, one per noisy image, in call order."""

    def __init__(self, classes, num_classes: int = 3):
        super().__init__()
        self.classes = list(classes)
        self.num_classes = num_classes
        self.pos = 0

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(self.classes[self.pos:self.pos + y.shape[0]])
        assert c.numel() == y.shape[0], 'the base classifier was called more often than scripted'
        self.pos += y.shape[0]
        return nn.functional.one_hot(c, self.num_classes).double()


# -- the certificate against closed forms ---------------------------------------------------------

def test_linear_classifier_radius_is_the_distance_to_the_hyperplane():
    """n = 10,000, alpha = 0.001: radii sound, inside the Monte Carlo envelope, within 5 % on average."""
    sigma, n, alpha, m = 0.25, 10000, 0.001, 40
    w = _w()
    ratios = np.linspace(1.25, 2.0, m)  # distance / sigma
    signs = np.where(np.arange(m) % 2 == 0, 1., -1.)
    distances = ratios * sigma
    x = _linear_images(signs * distances, w)
    smooth = Smooth(LinearTwoClass(w), num_classes=2, sigma=sigma)
    got = [smooth.certify(x[i], n0=100, n=n, alpha=alpha, batch_size=5000, index=i) for i in range(m)]
    assert [c for c, _ in got] == [0 if s > 0 else 1 for s in signs]
    radii = np.array([r for _, r in got])
    # Sound: a certified radius exceeds the true one with probability <= alpha (0.04 of 40 images expected).
    assert int((radii > distances).sum()) <= 1
    # The Monte Carlo envelope, from the closed form: the count of the top class is Binomial(n, Phi(d / sigma)),
    # and the radius a monotone function of that count.
    for d, r in zip(distances, radii):
        k_lo, k_hi = binom.ppf([1e-6, 1 - 1e-6], n, norm.cdf(d / sigma))
        r_lo = sigma * norm.ppf(binomtest(int(k_lo), n).proportion_ci(1 - 2 * alpha, 'exact').low)
        r_hi = sigma * norm.ppf(binomtest(int(k_hi), n).proportion_ci(1 - 2 * alpha, 'exact').low)
        assert r_lo <= r <= r_hi, (d, r, r_lo, r_hi)
    # The target, within 5 % of the distance: a lower confidence bound at n = 10,000 and alpha = 0.001
    # sits 4 % below it on average here (0.960 +- 0.002 over 40 images, from the binomial law; a single
    # image falls below 0.95 about one time in five, so the target is checked on the mean).
    assert 0.95 <= float(np.mean(radii / distances)) <= 1.0


def test_on_the_hyperplane_it_abstains():
    """p_A = 1/2 exactly: the lower bound is below 1/2 and nothing is certified."""
    w = _w()
    x = _linear_images([0.0], w)[0]
    smooth = Smooth(LinearTwoClass(w), num_classes=2, sigma=0.25)
    assert smooth.certify(x, n0=100, n=10000, alpha=0.001, batch_size=10000) == (ABSTAIN, 0.)
    assert smooth.predict(x, n=1000, alpha=0.001, batch_size=1000) == ABSTAIN


@pytest.mark.parametrize('n, alpha', [(100, 0.01), (1000, 0.001), (37, 0.05)])
def test_certify_abstains_exactly_when_the_bound_is_below_one_half(n, alpha):
    """Scripted counts on both sides of the threshold that scipy's exact interval sets."""
    def low(k):
        return binomtest(k, n).proportion_ci(1 - 2 * alpha, 'exact').low

    lo, hi = 0, n   # bisect for the first k whose bound reaches 1/2 (the bound grows with k)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if low(mid) < 0.5 else (lo, mid)
    k_star = lo
    assert low(k_star) >= 0.5 > low(k_star - 1)
    n0, sigma = 5, 0.3
    for k, expected in ((k_star - 1, ABSTAIN), (k_star, 1), (n, 1)):
        script = [1] * n0 + [1] * k + [2] * (n - k)   # selection picks class 1; k of n agree
        smooth = Smooth(Scripted(script), num_classes=3, sigma=sigma)
        c, r = smooth.certify(torch.zeros(SHAPE), n0=n0, n=n, alpha=alpha, batch_size=16)
        assert c == expected
        if expected == ABSTAIN:
            assert r == 0.
        else:
            # compared as probabilities: near p = 1/2 Phi^-1 magnifies the last digits of the bound (scipy's
            # binomtest finds the exact interval by root finding, to about 1e-9)
            assert norm.cdf(r / sigma) == pytest.approx(low(k), abs=1e-8)
    assert max_certified_radius(n, alpha, sigma) == pytest.approx(sigma * norm.ppf(low(n)), rel=1e-8)


def test_certify_counts_only_the_class_chosen_on_the_selection_samples():
    n0, n = 10, 100
    # Selection says class 2; estimation says class 0 every time: the bound on class 2 is 0, abstain.
    smooth = Smooth(Scripted([2] * n0 + [0] * n), num_classes=3, sigma=0.1)
    assert smooth.certify(torch.zeros(SHAPE), n0=n0, n=n, alpha=0.01, batch_size=7)[0] == ABSTAIN


@pytest.mark.parametrize('n_a, n_b', [(60, 40), (66, 34), (70, 30), (100, 0)])
def test_predict_abstains_when_the_top_two_are_not_told_apart(n_a, n_b):
    alpha = 0.01
    script = [0] * n_b + [1] * n_a   # class 1 wins
    smooth = Smooth(Scripted(script), num_classes=3, sigma=0.1)
    expected = ABSTAIN if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha else 1
    assert smooth.predict(torch.zeros(SHAPE), n=n_a + n_b, alpha=alpha, batch_size=9) == expected
    assert expected == (ABSTAIN if (n_a, n_b) in ((60, 40),) else 1)   # both branches are exercised


@pytest.mark.parametrize('k, n', [(0, 10), (1, 10), (9, 10), (10, 10), (0, 1), (1, 1), (512, 1000), (9990, 10000),
                                  (10000, 10000), (73, 100)])
@pytest.mark.parametrize('alpha', [0.001, 0.01, 0.05])
def test_clopper_pearson_matches_scipy_binomtest(k, n, alpha):
    ours = clopper_pearson_lower(k, n, alpha)
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method='exact').low
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-15)   # binomtest root-finds to about 1e-9


def test_clopper_pearson_covers_at_its_level():
    """P(bound > p) <= alpha, summed exactly over the binomial distribution."""
    n, alpha = 50, 0.05
    for p in (0.3, 0.55, 0.8, 0.97):
        miss = sum(binom.pmf(k, n, p) for k in range(n + 1) if clopper_pearson_lower(k, n, alpha) > p)
        assert miss <= alpha


def test_min_samples_is_the_first_that_can_certify():
    for alpha in (0.001, 0.01, 0.05, 0.25):
        m = min_certify_samples(alpha)
        assert clopper_pearson_lower(m, m, alpha) >= 0.5 > clopper_pearson_lower(m - 1, m - 1, alpha) if m > 1 else True
    assert min_certify_samples(0.001) == 10


# -- reproducibility and batching ------------------------------------------------------------------

def test_noise_does_not_depend_on_the_batch_size_and_follows_the_seed():
    whole = torch.cat(list(smoothing_noise(SHAPE, 50, 50, seed=3, index=7)))
    chunks = list(smoothing_noise(SHAPE, 50, 7, seed=3, index=7))
    assert [c.shape[0] for c in chunks] == [7] * 7 + [1]
    assert torch.equal(torch.cat(chunks), whole)
    assert torch.equal(torch.cat(list(smoothing_noise(SHAPE, 50, 50, seed=3, index=7))), whole)   # same seed
    for other in (dict(seed=4, index=7), dict(seed=3, index=8), dict(seed=3, index=7, phase=PHASE_SELECT)):
        assert not torch.allclose(torch.cat(list(smoothing_noise(SHAPE, 50, 50, **other))), whole)
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1) < 0.05


def test_batched_counts_equal_a_loop_over_samples():
    """Smooth's batched counts against one forward per noisy copy, with the noise drawn here."""
    w = _w(1)
    model = LinearTwoClass(w)
    x = _linear_images([0.05], w)[0]   # near the hyperplane: both classes occur
    sigma, num = 0.3, 200
    counts = Smooth(model, 2, sigma).sample_counts(x, num, 64, seed=5, index=11)
    eps = torch.cat(list(smoothing_noise(SHAPE, num, 1, seed=5, index=11, phase=PHASE_ESTIMATE))).double()
    loop = np.zeros(2, dtype=np.int64)
    for e in eps:
        loop[int(model((x + sigma * e)[None]).argmax())] += 1
    assert counts.tolist() == loop.tolist() and min(counts) > 20


class Recorder(nn.Module):
    """Records every noisy image it is given; predicts class 0."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, y):
        self.seen.append(y.clone())
        return torch.zeros(y.shape[0], 2, dtype=y.dtype).index_fill_(1, torch.tensor([0]), 1.)


def test_selection_and_estimation_draw_independent_noise():
    """Cohen et al.'s two stages: n0 selection samples, then n fresh ones (reusing them would bias the bound)."""
    x, sigma, n0, n = rand_images(*SHAPE, seed=4), 0.2, 6, 30
    rec = Recorder()
    Smooth(rec, 2, sigma).certify(x, n0, n, 0.01, batch_size=8, seed=2, index=9)
    seen = torch.cat(rec.seen)
    sel = torch.cat(list(smoothing_noise(SHAPE, n0, n0, seed=2, index=9, phase=PHASE_SELECT))).double()
    est = torch.cat(list(smoothing_noise(SHAPE, n, n, seed=2, index=9, phase=PHASE_ESTIMATE))).double()
    torch.testing.assert_close(seen, torch.cat([x + sigma * sel, x + sigma * est]))
    assert not torch.allclose(sel, est[:n0])


def test_a_seed_reproduces_results_and_another_seed_draws_others():
    w = _w(2)
    model = LinearTwoClass(w)
    x = _linear_images([0.2], w)[0]
    smooth = Smooth(model, 2, 0.25)
    a = smooth.certify(x, n0=50, n=2000, alpha=0.001, batch_size=300, seed=0, index=4)
    b = smooth.certify(x, n0=50, n=2000, alpha=0.001, batch_size=2000, seed=0, index=4)
    c = smooth.certify(x, n0=50, n=2000, alpha=0.001, batch_size=300, seed=1, index=4)
    assert a == b   # same seed, other batch size: identical
    assert a[0] == c[0] == 0 and a[1] != c[1]   # other seed: other draws, another radius


# -- denoised smoothing ----------------------------------------------------------------------------

def test_denoised_classifier_is_the_model_applied_to_its_own_denoiser():
    model = make_small_gradresnet()
    y = rand_images(4, 3, 13, 11, seed=1)
    sigma = 0.2
    with torch.no_grad():
        blind = DenoisedClassifier(model)(y)
        cond = DenoisedClassifier(model, sigma=sigma, conditional=True)(y)
        c = model(y).argmax(-1)
        want_blind = model(model.denoise(y))
        want_cond = model(model.denoise(y, sigma=sigma, c=c))
    torch.testing.assert_close(blind, want_blind)
    torch.testing.assert_close(cond, want_cond)
    assert not torch.allclose(blind, model(y))   # denoising changes what is classified
    with pytest.raises(ValueError, match='needs the noise level'):
        DenoisedClassifier(model, conditional=True)
    with pytest.raises(TypeError, match='denoise'):
        DenoisedClassifier(nn.Linear(3, 3))


def test_denoised_smoothing_builds_no_graph(monkeypatch):
    """Under no_grad with the model in eval mode, the input gradient is taken without create_graph."""
    model = make_small_gradresnet(dtype=torch.float32)
    calls = []
    grad = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get('create_graph', False))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, 'grad', spy)
    x = rand_images(3, 12, 12, dtype=torch.float32)
    for conditional in (False, True):
        base = DenoisedClassifier(model, sigma=0.1, conditional=conditional)
        counts = Smooth(base, model.num_classes, 0.1).sample_counts(x, 12, 5, seed=0, index=0)
        assert counts.sum() == 12
        with torch.no_grad():
            out = base(x[None] + 0.1)
        assert not out.requires_grad and out.grad_fn is None
    assert calls and not any(calls)
    assert all(p.grad is None for p in model.parameters())


# -- the grid: several models, modes and sigmas on the same images and noise -----------------------

def test_certify_grid_equals_smooth_image_by_image():
    torch.manual_seed(0)
    joint = timm.create_model('gradresnet_tiny_joint', num_classes=10, channels=(8, 16), layers=(1, 1)).eval()
    plain = timm.create_model('test_resnet', num_classes=10).eval()
    x = rand_images(3, 3, 16, 16, dtype=torch.float32, seed=2)
    with torch.no_grad():
        labels = joint(x).argmax(1)
    indices = [5, 17, 2]
    lines = []
    kw = dict(n0=4, n=16, alpha=0.05, seed=3)
    out = certify_grid({'joint': joint, 'plain': plain}, x, labels, indices, sigmas=[0.1, 0.2],
                       modes=('own', 'denoised', 'denoised_cond'), batch_size=7, log=lines.append, **kw)
    json.dumps(out, allow_nan=False)
    assert set(out['models']['joint']) == {'own', 'denoised', 'denoised_cond'}
    assert set(out['models']['plain']) == {'own'} and out['skipped'] == {'plain': ['denoised', 'denoised_cond']}
    assert len(lines) == 1 and 'estimated' in lines[0]
    assert out['index'] == indices and out['label'] == labels.tolist()
    for name, model, mode, sigma in (('joint', joint, 'own', 0.1), ('joint', joint, 'denoised', 0.2),
                                     ('joint', joint, 'denoised_cond', 0.2), ('plain', plain, 'own', 0.2)):
        cell = out['models'][name][mode][f'{sigma * 255:g}']
        base = model if mode == 'own' else DenoisedClassifier(model, sigma=sigma, conditional=mode == 'denoised_cond')
        smooth = Smooth(base, 10, sigma)
        direct = [smooth.certify(x[i], batch_size=16, index=indices[i], **kw) for i in range(3)]
        assert cell['prediction'] == [c for c, _ in direct]
        assert cell['radius'] == pytest.approx([r for _, r in direct])
        correct = [p == c for p, c in zip(cell['prediction'], out['label'])]
        assert cell['accuracy']['0'] == certified_accuracy(cell['radius'], correct, 0.)
    # the models were put back in the mode they came in
    assert not joint.training and not plain.training


def test_accuracy_curve_is_the_exact_step_function():
    radii = [0.3, 0.1, 0.0, 0.3, 0.5, 0.2]
    correct = [True, True, False, True, False, True]
    curve = certified_accuracy_curve(radii, correct)
    assert curve['radius'] == [0.0, 0.1, 0.2, 0.3]
    assert curve['accuracy'] == pytest.approx([100 * 4 / 6, 100 * 4 / 6, 100 * 3 / 6, 100 * 2 / 6])
    for r in np.linspace(0, 0.6, 25):   # against a direct count at every radius
        j = next((j for j, b in enumerate(curve['radius']) if b >= r), None)
        from_curve = curve['accuracy'][j] if j is not None else 0.
        assert from_curve == pytest.approx(certified_accuracy(radii, correct, r))


# -- bad input -------------------------------------------------------------------------------------

class _Exploding(nn.Module):
    num_classes = 2

    def forward(self, x):
        raise AssertionError('the model must not run on bad input')


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(n=0), ValueError, r'n \(estimation samples\) must be >= 1'),
    (dict(n0=0), ValueError, r'n0 \(selection samples\) must be >= 1'),
    (dict(n=2.5), TypeError, 'must be an integer'),
    (dict(n=True), TypeError, 'must be an integer'),
    (dict(n=5), ValueError, r'cannot certify anything at alpha=0.001.*n >= 10'),
    (dict(alpha=0.), ValueError, r'alpha must be in \(0, 1\)'),
    (dict(alpha=1.), ValueError, r'alpha must be in \(0, 1\)'),
    (dict(alpha=float('nan')), ValueError, r'alpha must be in \(0, 1\)'),
    (dict(alpha='0.01'), TypeError, 'alpha must be a float'),
    (dict(batch_size=0), ValueError, 'batch_size must be >= 1'),
])
def test_bad_settings_are_refused_before_any_work(kwargs, error, match):
    settings = dict(n0=10, n=100, alpha=0.001, batch_size=10)
    settings.update(kwargs)
    smooth = Smooth(_Exploding(), num_classes=2, sigma=0.1)
    with pytest.raises(error, match=match):
        smooth.certify(torch.zeros(SHAPE), **settings)
    with pytest.raises(error, match=match):
        check_certify_args(settings['n0'], settings['n'], settings['alpha'], settings['batch_size'])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r'one image \[C, H, W\]'):
        Smooth(_Exploding(), 2, 0.1).certify(torch.zeros(1, *SHAPE), 10, 100, 0.001, 10)
    with pytest.raises(ValueError, match='sigma must be finite and > 0'):
        Smooth(_Exploding(), 2, 0.)
    with pytest.warns(UserWarning, match='sigma/255'):
        Smooth(_Exploding(), 2, 25.)
    with pytest.raises(ValueError, match=r'logits \[B, num_classes\] = \[4, 3\]'):
        Smooth(LinearTwoClass(_w()), 3, 0.1).sample_counts(torch.zeros(SHAPE, dtype=torch.float64), 4, 4)
    x = torch.rand(2, *SHAPE)
    grid = dict(sigmas=[0.1], n0=10, n=100, batch_size=10)
    with pytest.raises(ValueError, match='modes must be'):
        certify_grid({'m': _Exploding()}, x, torch.zeros(2, dtype=torch.long), [0, 1], modes=('own', 'noisy'), **grid)
    with pytest.raises(ValueError, match='sigmas must be'):
        certify_grid({'m': _Exploding()}, x, torch.zeros(2, dtype=torch.long), [0, 1], **dict(grid, sigmas=[0.]))
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        certify_grid({'m': _Exploding()}, x * 3, torch.zeros(2, dtype=torch.long), [0, 1], **grid)
    with pytest.raises(ValueError, match='no classifier'):
        certify_grid({'m': nn.Identity()}, x, torch.zeros(2, dtype=torch.long), [0, 1], **grid)
    with pytest.raises(ValueError, match=r'indices \[N\]'):
        certify_grid({'m': _Exploding()}, x, torch.zeros(2, dtype=torch.long), [0], **grid)


# -- the command line, CI-sized --------------------------------------------------------------------

@pytest.fixture(scope='module')
def cli(tmp_path_factory):
    from timm_joint.data import prepare_quickstart
    from timm_joint.hub import save_pretrained
    from timm_joint.evaluate import run
    root = tmp_path_factory.mktemp('certify')
    qs = prepare_quickstart(root / 'qs', patch_size=16, train_per_class=2, val_per_class=2, short_side=96,
                            images=('astronaut', 'brick', 'coffee'))
    torch.manual_seed(0)
    tiny = timm.create_model('gradresnet_tiny_joint', num_classes=3, channels=(8, 16), layers=(1, 1))
    run_dir = root / 'runs' / 'tiny'
    save_pretrained(tiny, run_dir / 'export', model_name='gradresnet_tiny_joint',
                    model_args={'num_classes': 3, 'channels': [8, 16], 'layers': [1, 1]})
    (run_dir / 'args.yaml').write_text(yaml.safe_dump({'sigma_max_cls': 30, 'sigma_max_den': 90}))
    ref = timm.create_model('test_resnet', num_classes=3)
    save_pretrained(ref, root / 'ref' / 'export', model_name='test_resnet', model_args={'num_classes': 3})
    out = root / 'out'
    common = ['--data-dir', str(qs), '--img-size', '16', '--workers', '0', '--batch-size', '8', '--no-progress',
              '--sigmas', '0', '--psnr-sigmas', '25', '--eigen-k', '0', '--grid-images', '1']
    argv = ['--model', 'gradresnet_tiny_joint', '--checkpoint', str(run_dir / 'export'), *common, '--out', str(out),
            '--certify', '--certify-sigmas', '25', '50', '--certify-n', '20', '--certify-n0', '4',
            '--certify-alpha', '0.01', '--certify-images', '4', '--certify-batch-size', '6',
            '--reference-model', 'test_resnet', '--reference-checkpoint', str(root / 'ref' / 'export')]
    results = run(argv)
    return {'root': root, 'qs': str(qs), 'out': out, 'argv': argv, 'common': common, 'results': results,
            'tiny': str(run_dir / 'export'), 'ref': str(root / 'ref' / 'export')}


def test_cli_certifies_the_model_and_the_reference(cli, capfd):
    from timm_joint.evaluate import validate_results
    r = json.loads((cli['out'] / 'results.json').read_text())
    validate_results(r)
    c = r['certify']
    assert (c['n0'], c['n'], c['alpha'], c['num_images']) == (4, 20, 0.01, 4)
    assert c['sigmas'] == ['25', '50'] and c['radii'] == ['0', '0.25', '0.5', '0.75', '1']
    assert set(c['models']['gradresnet_tiny_joint']) == {'own', 'denoised'}
    assert set(c['models']['test_resnet']) == {'own'}
    # sigma 50 lies above the tiny model's classification training range (30); the reference's is unknown.
    assert c['outside_training'] == {'gradresnet_tiny_joint': ['50'], 'test_resnet': []}
    assert c['max_radius']['25'] == pytest.approx(max_certified_radius(20, 0.01, 25 / 255))
    assert (cli['out'] / 'figures' / 'certified_accuracy.png').stat().st_size > 1000
    md = (cli['out'] / 'results.md').read_text()
    assert '## Certified top-1 (%)' in md and '| gradresnet_tiny_joint | denoised D(y) | 50* |' in md


def test_cli_certificates_equal_direct_calls(cli):
    """The command line's certificate of each image equals Smooth.certify on the same image and index."""
    from timm_joint.data import create_eval_dataset
    from timm_joint.evaluate import load_model
    c = cli['results']['certify']
    ds = create_eval_dataset('', cli['qs'], img_size=16, split='validation')
    model, _ = load_model('gradresnet_tiny_joint', cli['tiny'])
    for mode, base in (('own', model), ('denoised', DenoisedClassifier(model))):
        smooth = Smooth(base, 3, 50 / 255)
        for i, index in enumerate(c['index']):
            x, label, idx = ds[index]
            assert idx == index and label == c['label'][i]
            pred, radius = smooth.certify(x, 4, 20, 0.01, 20, seed=0, index=index)
            assert c['models']['gradresnet_tiny_joint'][mode]['50']['prediction'][i] == pred
            assert c['models']['gradresnet_tiny_joint'][mode]['50']['radius'][i] == pytest.approx(radius)


@pytest.mark.parametrize('extra, match', [
    (['--certify-n', '3'], 'cannot certify anything'),
    (['--certify-alpha', '1.5'], r'alpha must be in \(0, 1\)'),
    (['--certify-n0', '0'], r'n0 \(selection samples\) must be >= 1'),
    (['--certify-sigmas', '0'], '--certify-sigmas must be noise levels > 0'),
    (['--certify-batch-size', '0'], 'batch_size must be >= 1'),
])
def test_cli_bad_certify_settings_fail_before_work(cli, tmp_path, extra, match):
    from timm_joint.evaluate import run
    out = tmp_path / 'o'
    with pytest.raises(ValueError, match=match):
        run(['--model', 'gradresnet_tiny_joint', '--checkpoint', cli['tiny'], *cli['common'], '--out', str(out),
             '--certify', *extra])
    assert not out.exists()


@pytest.mark.parametrize('flags, modes', [
    ([], ['own', 'denoised']),
    (['--certify-mode', 'own'], ['own']),
    (['--certify-mode', 'denoised', '--certify-denoiser', 'conditional'], ['denoised_cond']),
    (['--certify-denoiser', 'conditional'], ['own', 'denoised_cond']),
])
def test_cli_modes_name_the_base_classifiers(flags, modes):
    from timm_joint.evaluate import _certify_mode_list, parse_args
    assert _certify_mode_list(parse_args(['--model', 'm', '--certify', *flags])) == modes


def test_cli_denoised_mode_needs_a_denoiser(cli, tmp_path):
    from timm_joint.evaluate import run
    with pytest.raises(ValueError, match='--certify-mode denoised needs a model that classifies and denoises'):
        run(['--model', 'test_resnet', '--checkpoint', cli['ref'], *cli['common'], '--out', str(tmp_path / 'o'),
             '--certify', '--certify-mode', 'denoised'])


@pytest.mark.parametrize('mutate, match', [
    (lambda c: c.update(alpha=2), r'certify.alpha'),
    (lambda c: c['models']['test_resnet']['own']['25']['accuracy'].pop('0.5'), 'accuracy must map the radii'),
    (lambda c: c['models']['test_resnet']['own']['25']['radius'].append(0.1), 'radius must be 4 radii'),
    (lambda c: c['models']['test_resnet'].update(noisy=c['models']['test_resnet']['own']), 'base classifiers'),
    (lambda c: c['models']['test_resnet']['own'].pop('50'), 'one cell per sigma'),
])
def test_validate_results_rejects_broken_certify(cli, mutate, match):
    from timm_joint.evaluate import validate_results
    r = json.loads((cli['out'] / 'results.json').read_text())
    mutate(r['certify'])
    with pytest.raises(ValueError, match=match):
        validate_results(r)


# -- training the baselines: Gaussian augmentation at one fixed sigma (Cohen et al.), or none --------

def test_fixed_classification_noise_puts_every_image_at_one_sigma():
    from timm_joint.data import IndexedDataset

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.full((3, 4, 4), i / 10.), i

    ramp = IndexedDataset(Images(), seed=1, stream=1, sigma_max=50 / 255)
    fixed = IndexedDataset(Images(), seed=1, stream=1, sigma_max=25 / 255, sigma_dist='fixed')
    clean = IndexedDataset(Images(), seed=1, stream=1, sigma_max=0., sigma_dist='fixed')
    sig_ramp = []
    for i in range(6):
        _, _, _, s_r, e_r = ramp[i]
        _, _, _, s_f, e_f = fixed[i]
        _, _, _, s_c, _ = clean[i]
        assert float(s_f) == pytest.approx(25 / 255) and float(s_c) == 0.
        assert torch.equal(e_r, e_f)   # the same eps: only the level differs
        sig_ramp.append(float(s_r))
    assert len(set(sig_ramp)) == 6 and max(sig_ramp) <= 50 / 255
    with pytest.raises(ValueError, match='sigma_max > 0'):
        IndexedDataset(Images(), seed=1, sigma_max=0.)
    with pytest.raises(ValueError, match='sigma_dist must be one of'):
        IndexedDataset(Images(), seed=1, sigma_max=0.1, sigma_dist='uniform')


def test_train_joint_records_the_fixed_classification_noise(tmp_path):
    """A clean-trained classifier (--sigma-dist-cls fixed --sigma-max-cls 0): every certification sigma is
    outside its training noise, and evaluate reads that from the export."""
    import importlib.util
    from pathlib import Path
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from timm_joint.data import prepare_quickstart
    from timm_joint.evaluate import _outside_cls_range, read_training_cls_noise
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('train_joint_cert', root / 'train_joint.py')
    train_joint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_joint)
    data = prepare_quickstart(tmp_path / 'qs', patch_size=16, train_per_class=4, val_per_class=1, short_side=96,
                              images=('astronaut', 'brick'))
    args = ['--model', 'gradresnet_tiny_joint', '--model-kwargs', 'channels=[8,16]', 'layers=[1,1]',
            '--num-classes', '2', '--img-size', '16', '-j', '0', '--no-progress', '--data-dir', str(data),
            '--task', 'classification', '-b', '4', '--epochs', '1', '--max-steps', '1',
            '--output', str(tmp_path / 'runs'), '--experiment', 'clean']

    def reset_accelerate():   # in-process runs share Accelerate's singletons (as in test_train.py)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    def train(extra):
        reset_accelerate()
        try:
            return train_joint.main(args + extra)
        finally:
            reset_accelerate()

    with pytest.raises(ValueError, match='0 only with --sigma-dist-cls fixed'):
        train(['--sigma-max-cls', '0'])
    out = train(['--sigma-dist-cls', 'fixed', '--sigma-max-cls', '0'])
    noise = read_training_cls_noise(str(out / 'export' / 'last'))
    assert noise['sigma_max_cls_255'] == 0 and noise['sigma_dist_cls'] == 'fixed'
    assert _outside_cls_range(['12', '25'], noise) == ['12', '25']
    assert _outside_cls_range(['12', '25', '50'], {'sigma_max_cls_255': 25., 'sigma_dist_cls': 'fixed'}) == ['12', '50']
    assert _outside_cls_range(['12', '25', '50'], {'sigma_max_cls_255': 25., 'sigma_dist_cls': 'squared_uniform'}) == ['50']


def test_sweep_certify_preset_trains_the_noise_baseline_and_tabulates_certified_accuracy(tmp_path, monkeypatch):
    """CI's small version of the comparison command: Cohen et al.'s baseline, two steps, n = 20."""
    from timm_joint import sweep
    from timm_joint.data import prepare_quickstart
    data = tmp_path / 'qs'
    prepare_quickstart(data, patch_size=16, train_per_class=4, val_per_class=2, short_side=96,
                       images=('astronaut', 'brick', 'coffee'))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(yaml.safe_dump({'model': 'gradresnet_tiny_joint', 'num_classes': 3, 'img_size': 16,
                                   'batch_size': 6, 'epochs': 1, 'workers': 0}))
    monkeypatch.setitem(sweep.DATASETS, 'tiny', (str(data), 'quickstart'))
    monkeypatch.setattr(sweep, '_prepare', lambda *a, **k: None)
    name = 'timm resnet18, noise 25 (Cohen et al.)'
    eval_args = ['--certify-n', '20', '--certify-n0', '4', '--certify-alpha', '0.01', '--certify-images', '3']
    with pytest.raises(ValueError, match='pass evaluate=True'):
        sweep.run_sweep('certify', config=str(cfg), dataset='tiny', steps=2, out=tmp_path / 's', variants=[name])
    [rec] = sweep.run_sweep('certify', config=str(cfg), dataset='tiny', steps=2, out=tmp_path / 's', variants=[name],
                            evaluate=True, eval_args=eval_args)
    run_dir = tmp_path / 's' / f"{name.replace(' ', '_')}_seed42"
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert (args['model'], args['sigma_dist_cls'], args['sigma_max_cls']) == ('resnet18', 'fixed', 25)
    [eval_dir] = run_dir.glob('eval-*')   # its own folder: the evaluation arguments differ from the default
    res = json.loads((eval_dir / 'results.json').read_text())
    assert (res['certify']['n'], res['certify']['sigmas']) == (20, ['25'])
    cell = res['certify']['models'][res['model']['name']]['own']['25']
    assert rec['cert_own_s25_r0'] == cell['accuracy']['0'] and rec['cls_noise'] == 'fixed 25'
    assert res['certify']['outside_training'][res['model']['name']] == []
    table = sweep.render_table([rec], sweep.PRESET_COLUMNS['certify'])
    assert '| cls noise | top-1 σ=0 | top-1 σ=25 | own, σ=25, r=0 |' in table and '| fixed 25 |' in table
