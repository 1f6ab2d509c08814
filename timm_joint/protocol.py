"""The denoiser protocol (DESIGN §4) and what callers may ask of a model, in one place.

Every denoiser here, joint or dedicated, has::

    model.denoise(y, *, sigma=None, c=None) -> x_hat     # y, x_hat [B, C, H, W], pixels in [0, 1]
    model.blind: bool                                    # True: sigma is not needed, and ignored

A joint model (``JointDensityMixin``: GradResNet, JointDensityWrapper) is blind, has an energy E with
D(y) = y - grad E(y) and, with a classifier head, a class-conditional D(y, c). deepinv's DnCNN is blind,
DRUNet is not. Training, evaluation and certification ask these helpers rather than probing attributes
or comparing class names.

The protocol's checked entry point is ``denoise``; a training step calls ``_denoise(y, sigma, c)``, the
same maths without the input checks (``losses.JointObjective``).
"""
from typing import Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn as nn

from .joint import JointDensityMixin
from .noise import SigmaLike

__all__ = ['Denoiser', 'is_denoiser', 'is_blind', 'has_classifier', 'has_energy', 'is_joint', 'denoise_blind']


@runtime_checkable
class Denoiser(Protocol):
    """A model with ``denoise(y, *, sigma=None, c=None)`` that declares whether it is ``blind``."""

    blind: bool

    def denoise(self, y: torch.Tensor, *, sigma: Optional[SigmaLike] = None,
                c: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        ...


def is_denoiser(model: nn.Module) -> bool:
    """Whether the model denoises (has ``denoise``): the joint models and the dedicated baselines."""
    return callable(getattr(model, 'denoise', None))


def is_blind(model: nn.Module) -> bool:
    """Whether the model's ``denoise`` works without sigma. A denoiser that does not declare ``blind``
    is taken as non-blind: telling it sigma is always allowed, withholding it is not."""
    return bool(getattr(model, 'blind', False))


def has_classifier(model: nn.Module) -> bool:
    """Whether the model classifies (``num_classes > 0``); a dedicated denoiser does not."""
    return int(getattr(model, 'num_classes', 0) or 0) > 0


def has_energy(model: nn.Module) -> bool:
    """Whether the model has an explicit energy E (``energy``, ``log_prob``, ``forward_joint``) with
    D(y) = y - grad E(y): the joint models."""
    return isinstance(model, JointDensityMixin)


def is_joint(model: nn.Module) -> bool:
    """Whether the model both classifies and has an energy, hence a class-conditional D(y, c)."""
    return has_energy(model) and has_classifier(model)


def denoise_blind(model: nn.Module, y: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """The model's unconditional denoiser at noise level ``sigma`` (pixel units): D(y), with sigma
    told only to a non-blind model, so that a blind one is not given a value to check."""
    return model.denoise(y) if is_blind(model) else model.denoise(y, sigma=sigma)
