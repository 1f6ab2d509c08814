"""Bad input gets a ValueError or TypeError whose message says what was expected (DESIGN §4)."""
import warnings

import numpy as np
import pytest
import torch

from timm_joint import JointDensityWrapper

from conftest import make_small_gradresnet, rand_images

GOOD = rand_images(2, 3, 13, 11)


def _with(value: float) -> torch.Tensor:
    y = GOOD.clone()
    y[1, 2, 5, 3] = value
    return y


# Every public joint-density method, called with an image and otherwise valid arguments.
METHODS = {
    'energy': lambda m, y: m.energy(y),
    'log_prob': lambda m, y: m.log_prob(y, sigma=0.1),
    'log_prob_c': lambda m, y: m.log_prob(y, sigma=0.1, c=1),
    'score': lambda m, y: m.score(y, sigma=0.1, c=1),
    'denoise': lambda m, y: m.denoise(y),
    'denoise_c': lambda m, y: m.denoise(y, sigma=0.1, c=1),
    'adversarial_gradient': lambda m, y: m.adversarial_gradient(y, c=1),
}

BAD_IMAGES = {
    'no batch dim': (ValueError, r'\[B, 3, H, W\]', GOOD[0]),
    'five dims': (ValueError, r'\[B, 3, H, W\]', GOOD[None]),
    'one channel': (ValueError, r'\[B, 3, H, W\]', GOOD[:, :1]),
    'four channels': (ValueError, r'\[B, 3, H, W\]', torch.cat([GOOD, GOOD[:, :1]], 1)),
    'uint8': (TypeError, r'convert to float in \[0, 1\]', (GOOD * 255).to(torch.uint8)),
    'int64': (TypeError, r'convert to float in \[0, 1\]', (GOOD * 255).long()),
    'nan': (ValueError, 'NaN or inf', _with(float('nan'))),
    'inf': (ValueError, 'NaN or inf', _with(float('-inf'))),
    'list': (TypeError, 'image tensor', GOOD.tolist()),
}


@pytest.fixture(scope='module')
def model():
    return make_small_gradresnet()


@pytest.mark.parametrize('method', sorted(METHODS))
@pytest.mark.parametrize('case', sorted(BAD_IMAGES))
def test_bad_images(model, method, case):
    exc, match, y = BAD_IMAGES[case]
    with pytest.raises(exc, match=match):
        METHODS[method](model, y)


BAD_SIGMAS = {
    'zero': (ValueError, '> 0', 0.),
    'negative': (ValueError, '> 0', -0.1),
    'negative in batch': (ValueError, '> 0', torch.tensor([0.1, -0.1], dtype=torch.float64)),
    'nan': (ValueError, 'finite', float('nan')),
    'inf': (ValueError, 'finite', float('inf')),
    'wrong length': (ValueError, r'shape \[B\]=\[2\]', torch.tensor([0.1, 0.2, 0.3])),
    'two dims': (ValueError, r'shape \[B\]=\[2\]', torch.full((2, 1), 0.1)),
    'string': (TypeError, 'float in pixel units', '25'),
    'list': (TypeError, 'float in pixel units', [0.1, 0.2]),
    'none for log_prob': (TypeError, 'float in pixel units', None),
    'bool': (TypeError, 'float in pixel units', True),
    'bool tensor': (TypeError, 'real tensor', torch.tensor([True, True])),
}


@pytest.mark.parametrize('case', sorted(BAD_SIGMAS))
def test_bad_sigma(model, case):
    exc, match, sigma = BAD_SIGMAS[case]
    for call in (lambda: model.log_prob(GOOD, sigma=sigma), lambda: model.score(GOOD, sigma=sigma, c=0)):
        with pytest.raises(exc, match=match):
            call()
    if sigma is not None:  # None is the blind denoiser's default
        with pytest.raises(exc, match=match):
            model.denoise(GOOD, sigma=sigma, c=0)
        with pytest.raises(exc, match=match):
            model.denoise(GOOD, sigma=sigma)  # a given sigma is validated even where unused


def test_sigma_in_0_255_units_warns(model):
    with pytest.warns(UserWarning, match='did you mean sigma/255'):
        model.log_prob(GOOD, sigma=25)
    with pytest.warns(UserWarning, match='did you mean sigma/255'):
        model.denoise(GOOD, sigma=torch.tensor([0.1, 50.], dtype=torch.float64), c=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model.log_prob(GOOD, sigma=1.0)  # the edge of the range is fine


BAD_CLASSES = {
    'too large': (ValueError, r'0 <= c < 5', 5),
    'negative': (ValueError, r'0 <= c < 5', -1),
    'one too large in batch': (ValueError, r'0 <= c < 5', torch.tensor([0, 7])),
    'wrong length': (ValueError, r'shape \[B\]=\[2\]', torch.tensor([0, 1, 2])),
    'two dims': (ValueError, r'shape \[B\]=\[2\]', torch.tensor([[0], [1]])),
    'float tensor': (TypeError, 'integer tensor', torch.tensor([0., 1.])),
    'bool tensor': (TypeError, 'integer tensor', torch.tensor([True, False])),
    'float': (TypeError, 'int or a LongTensor', 1.0),
    'string': (TypeError, 'int or a LongTensor', '1'),
    'bool': (TypeError, 'int or a LongTensor', True),
}


@pytest.mark.parametrize('case', sorted(BAD_CLASSES))
def test_bad_class(model, case):
    exc, match, c = BAD_CLASSES[case]
    for call in (lambda: model.log_prob(GOOD, sigma=0.1, c=c), lambda: model.score(GOOD, sigma=0.1, c=c),
                 lambda: model.denoise(GOOD, sigma=0.1, c=c), lambda: model.adversarial_gradient(GOOD, c=c)):
        with pytest.raises(exc, match=match):
            call()


def test_good_class_forms_agree(model):
    # An int, a 0-d tensor, an int32 tensor and a LongTensor [B] name the same classes.
    ref = model.log_prob(GOOD, sigma=0.1, c=torch.tensor([3, 3]))
    for c in (3, np.int64(3), torch.tensor(3), torch.tensor([3, 3], dtype=torch.int32)):
        torch.testing.assert_close(model.log_prob(GOOD, sigma=0.1, c=c), ref)


def test_class_conditional_denoise_needs_sigma(model):
    with pytest.raises(ValueError, match='needs the noise level'):
        model.denoise(GOOD, c=1)
    with pytest.raises(TypeError):  # keyword-only and required
        model.log_prob(GOOD, 0.1)
    with pytest.raises(TypeError):
        model.score(GOOD, c=1)


def test_headless_models_refuse_classes():
    headless = make_small_gradresnet(num_classes=0)
    assert headless.denoise(GOOD).shape == GOOD.shape  # the blind denoiser needs no head
    for call in (lambda: headless.log_prob(GOOD, sigma=0.1, c=0), lambda: headless.denoise(GOOD, sigma=0.1, c=0),
                 lambda: headless.adversarial_gradient(GOOD, c=0)):
        with pytest.raises(ValueError, match=r'num_classes > 0'):
            call()


def test_wrapper_validates_its_input_and_its_model():
    import timm
    wrapped = JointDensityWrapper(timm.create_model('resnet18', num_classes=4), warn_untrained=False)
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\]'):
        wrapped.denoise(torch.rand(1, 1, 16, 16))
    with pytest.raises(TypeError, match='convert to float'):
        wrapped.denoise(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'0 <= c < 4'):
        wrapped.adversarial_gradient(torch.rand(1, 3, 16, 16), c=4)
    with pytest.raises(TypeError, match='forward_features'):
        JointDensityWrapper(torch.nn.Linear(3, 3))


def test_model_construction_errors():
    with pytest.raises(ValueError, match='stem'):
        make_small_gradresnet(stem='64')
    with pytest.raises(ValueError, match='one entry per stage'):
        make_small_gradresnet(layers=(1, 1), channels=(8,))
    with pytest.raises(ValueError, match='norm_position'):
        make_small_gradresnet(norm_position='middle')
    with pytest.raises(ValueError, match='norm_layer'):
        make_small_gradresnet(norm_layer='layernorm')
