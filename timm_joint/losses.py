"""The joint objective: cross-entropy on noisy images plus denoising score matching.

    loss = CE(l(y_cls), c) + lambda * mean(||D(y_den) - x_den||^2)   (lambda = 1: the paper's unweighted sum)

``JointObjective`` wraps a joint-density model so that *one* module forward computes the logits of
the classification batch and the blind denoiser's output on the denoising batch. The input gradient
inside D is taken with ``torch.autograd.grad(create_graph=True)`` in that forward, and the caller runs
one ordinary ``backward()``: this is what DDP supports for a double backward (DESIGN §7).
``JointLoss`` is a small callable on its outputs (EDM style), returning a dict of terms.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .protocol import is_blind, is_denoiser

__all__ = ['JointObjective', 'JointLoss', 'linear_ramp', 'TASKS']

TASKS = ('joint', 'classification', 'denoising')


class JointObjective(nn.Module):
    """One forward for both tasks (what ``accelerator.prepare`` / DDP wraps).

    Args:
        model: A joint-density model (GradResNet or JointDensityWrapper), or any timm classifier
            for ``task='classification'``.
        task: 'joint', 'classification' or 'denoising'.
    """

    def __init__(self, model: nn.Module, task: str = 'joint'):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f'task must be one of {TASKS}, got {task!r}')
        if task != 'classification' and not is_denoiser(model):
            raise TypeError(
                f"task {task!r} needs a joint-density model (a GradResNet or a JointDensityWrapper), "
                f'got {type(model).__name__}')
        self.model = model
        self.task = task

    def forward(
            self,
            y_cls: Optional[torch.Tensor] = None,
            y_den: Optional[torch.Tensor] = None,
            sigma_den: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Args:
            y_cls: Noisy classification batch [B, C, H, W] (tasks 'joint', 'classification').
            y_den: Noisy denoising batch [B', C, H', W'] (tasks 'joint', 'denoising').
            sigma_den: Its noise levels [B']; a blind denoiser (GradResNet) is not given them (the
                loaders drew them, so they are not checked here), a non-blind baseline (DRUNet) needs them.

        Returns:
            dict with 'logits' [B, num_classes] and/or 'denoised' [B', C, H', W'].
        """
        out = {}
        if y_cls is not None:
            out['logits'] = self.model(y_cls)
        if y_den is not None:
            # In training mode the denoiser builds the graph of grad_y E, so backward reaches the weights.
            # The unchecked _denoise: the public denoise() checks its inputs on the host (a device sync
            # every step); the loader's tensors need no such check, and a NaN shows in the loss.
            if is_blind(self.model) or sigma_den is None:
                out['denoised'] = self.model._denoise(y_den)
            else:  # sigma = sigma_max * u^2 can round to 0; a non-blind net needs it positive
                out['denoised'] = self.model._denoise(y_den, sigma_den.clamp_min(1e-6))
        return out


class JointLoss:
    """CE(logits, target) + lambda_den * MSE(D(y), x), as a dict of terms.

    The paper's loss is the unweighted sum (``lambda_den = 1``): "we do not add any relative weighting
    of the classification and denoising objectives". Its mean-squared error is read two ways here
    (``reduction``): the per-pixel mean ('mean'), or the per-image sum of squares ('sum', the same as
    'mean' with lambda_den = C*H*W), averaged over the batch either way.

    Args:
        lambda_den: Weight of the denoising term.
        cls_loss_fn: Classification loss (e.g. timm's SoftTargetCrossEntropy with MixUp).
        weighting: 'none' (plain mean over the batch) or 'inv_sigma2' (each image weighted by
            1/sigma^2, the epsilon-prediction form; drives D to the identity when sigma -> 0).
        reduction: 'mean' (per-pixel mean of the squared error) or 'sum' (per-image sum).
    """

    def __init__(
            self,
            lambda_den: float = 1.0,
            cls_loss_fn: Optional[Callable] = None,
            weighting: str = 'none',
            reduction: str = 'mean',
    ):
        if weighting not in ('none', 'inv_sigma2'):
            raise ValueError(f"weighting must be 'none' or 'inv_sigma2', got {weighting!r}")
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if lambda_den < 0:
            raise ValueError(f'lambda_den must be >= 0, got {lambda_den}')
        self.lambda_den = lambda_den
        self.cls_loss_fn = cls_loss_fn if cls_loss_fn is not None else nn.CrossEntropyLoss()
        self.weighting = weighting
        self.reduction = reduction

    def __call__(
            self,
            out: Dict[str, torch.Tensor],
            target: Optional[torch.Tensor] = None,
            x_den: Optional[torch.Tensor] = None,
            sigma_den: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Args:
            out: ``JointObjective`` outputs.
            target: Class targets [B] or soft targets [B, num_classes].
            x_den: Clean denoising batch [B', C, H, W].
            sigma_den: Noise levels of the denoising batch [B'] (for 'inv_sigma2').

        Returns:
            dict with 'loss' and the terms present: 'loss_cls', 'loss_den' (the per-pixel mean squared
            error whatever the reduction, so that runs compare; the loss uses the reduction).
        """
        terms = {}
        loss = None
        if 'logits' in out:
            terms['loss_cls'] = self.cls_loss_fn(out['logits'].float(), target)
            loss = terms['loss_cls']
        if 'denoised' in out:
            sq = (out['denoised'].float() - x_den.float()).pow(2).flatten(1)
            err = sq.mean(1)  # [B']
            if self.weighting == 'inv_sigma2':
                err = err / sigma_den.float().pow(2).clamp_min(1e-8)
            terms['loss_den'] = err.mean()
            per_image = sq.shape[1] if self.reduction == 'sum' else 1
            den = (self.lambda_den * per_image) * terms['loss_den']
            loss = den if loss is None else loss + den
        if loss is None:
            raise ValueError('JointLoss got no outputs: expected logits and/or denoised')
        terms['loss'] = loss
        return terms


def linear_ramp(start: float, end: float, update: int, total_updates: int) -> float:
    """The weight at optimizer update ``update`` (0-based) of a linear ramp from ``start`` (first update)
    to ``end`` (last update, ``total_updates - 1``), held at ``end`` afterwards."""
    if total_updates < 1 or update < 0:
        raise ValueError(f'expected total_updates >= 1 and update >= 0, got {total_updates} and {update}')
    frac = min(1., update / max(1, total_updates - 1))
    return start + frac * (end - start)
