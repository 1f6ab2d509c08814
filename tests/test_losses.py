"""The joint loss's reductions and weights, each against the same quantity computed another way."""
import pytest
import torch

from timm_joint.losses import JointLoss


def _outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 7, 5, generator=g)
    out = {'logits': torch.randn(4, 6, generator=g), 'denoised': x + 0.1 * torch.randn(3, 3, 7, 5, generator=g)}
    return out, torch.tensor([0, 5, 2, 1]), x


def test_unweighted_sum_is_cross_entropy_plus_per_pixel_mse():
    out, target, x = _outputs()
    terms = JointLoss()(out, target, x)  # lambda 1: the paper's unweighted sum
    ce = torch.nn.functional.cross_entropy(out['logits'], target)
    mse = ((out['denoised'] - x) ** 2).mean()
    torch.testing.assert_close(terms['loss'], ce + mse)
    torch.testing.assert_close(terms['loss_den'], mse)


def test_sum_reduction_is_the_mean_times_the_pixels_per_image():
    # Path 1: reduction='sum' with lambda 1. Path 2: reduction='mean' with lambda C*H*W. Path 3: the
    # per-image sum of squares written out. loss_den stays the per-pixel mean, for comparisons.
    out, target, x = _outputs(1)
    by_sum = JointLoss(reduction='sum')(out, target, x)
    by_mean = JointLoss(lambda_den=3 * 7 * 5)(out, target, x)
    torch.testing.assert_close(by_sum['loss'], by_mean['loss'])
    per_image = ((out['denoised'] - x) ** 2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(by_sum['loss'] - by_sum['loss_cls'], per_image)
    torch.testing.assert_close(by_sum['loss_den'], ((out['denoised'] - x) ** 2).mean())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match='reduction'):
        JointLoss(reduction='median')
    with pytest.raises(ValueError, match='lambda_den'):
        JointLoss(lambda_den=-1.)
