"""Shared fixtures: small GradResNets and seeded inputs, so that identity checks run in seconds.

Identities are checked in float64 on models far smaller than any registered name (two stages, 8 and 16
channels) at odd sizes (13x11), where a wrong axis or a silently reshaped tensor cannot hide.
"""
import os
from pathlib import Path

import pytest
import torch

import timm_joint  # noqa: F401  (registers the models with timm)
from timm_joint.models.gradresnet import GradResNet


def pytest_configure(config):
    # Test models are tiny: with 2 threads on a shared 2-core machine, OpenMP synchronisation made
    # every small conv ~40x slower (a 7x5 energy took 47 ms with 2 threads, 1.2 ms with 1). One
    # thread unless OMP_NUM_THREADS says otherwise.
    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(1)


def make_small_gradresnet(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs) -> GradResNet:
    """A two-stage GradResNet (8, 16 channels; groups of 4 channels), 5 classes, in eval mode.

    ``energy_scale = 1`` (instead of 1/d) makes grad E comparable to the class gradient, so identities
    between them are not trivially met by two near-zero terms.
    """
    torch.manual_seed(seed)
    args = dict(layers=(1, 1), channels=(8, 16), num_classes=5, group_size=4)
    args.update(kwargs)
    model = GradResNet(**args).to(dtype).eval()
    model.energy_scale = 1.
    return model


def rand_images(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1] images from a fixed seed (independent of the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


@pytest.fixture
def small_model() -> GradResNet:
    return make_small_gradresnet()


class _Payload:
    """Unpickling this creates ``path``: stands for any code a malicious checkpoint would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def malicious_pickle(path: Path, sentinel: Path) -> None:
    """A PyTorch checkpoint whose unpickling would create ``sentinel`` (weights_only=True refuses it)."""
    torch.save({'stem.0.weight': torch.zeros(1), 'payload': _Payload(str(sentinel))}, str(path))
