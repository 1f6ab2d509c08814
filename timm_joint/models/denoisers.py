"""Dedicated denoisers as baselines: deepinv's DnCNN and DRUNet architectures, trained here.

They are registered with timm (``dncnn_deepinv``, ``drunet_deepinv``) only so that ``train_joint.py
--task denoising``, the exports (``local-dir:``) and ``python -m timm_joint.evaluate`` treat them like
the other models. They have no classifier (``num_classes == 0``). deepinv is an optional extra
(``pip install -e ".[denoisers]"``); the architectures are always built with ``pretrained=None``, so
nothing is downloaded. DRUNet is non-blind: its ``denoise`` needs sigma.
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..joint import _check_image
from ..noise import SigmaLike, check_sigma

__all__ = ['DeepinvDenoiser']


def _import_deepinv():
    try:
        import deepinv
    except ImportError as e:
        raise ImportError(
            'the DnCNN/DRUNet baselines use deepinv\'s architectures: pip install -e ".[denoisers]"') from e
    return deepinv


class DeepinvDenoiser(nn.Module):
    """A deepinv denoiser behind the ``denoise(y, *, sigma)`` interface of the joint models.

    Args:
        arch: 'dncnn' (blind residual CNN) or 'drunet' (non-blind UNet; takes sigma as an input map).
        in_chans: Image channels.
        num_classes: Must be 0 (there is no classifier); accepted so timm's factory can pass it.
        depth: DnCNN depth.
        width: DnCNN width, or DRUNet's first-scale width (doubling per scale).
        num_blocks: DRUNet residual blocks per scale.
    """

    def __init__(
            self,
            arch: str = 'dncnn',
            in_chans: int = 3,
            num_classes: int = 0,
            depth: int = 20,
            width: int = 64,
            num_blocks: int = 4,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if num_classes:
            raise ValueError(f'{arch} is a denoiser without a classifier: num_classes must be 0, got {num_classes}')
        dinv = _import_deepinv()
        self.arch = arch
        self.in_chans = in_chans
        self.num_classes = 0
        self.num_features = 0
        if arch == 'dncnn':
            self.net = dinv.models.DnCNN(in_channels=in_chans, out_channels=in_chans, depth=depth, nf=width,
                                         pretrained=None, device='cpu')
            self.blind = True
        elif arch == 'drunet':
            nc = tuple(width * 2 ** i for i in range(4))
            self.net = dinv.models.DRUNet(in_channels=in_chans, out_channels=in_chans, nc=nc, nb=num_blocks,
                                          pretrained=None, device='cpu')
            self.blind = False
        else:
            raise ValueError(f"arch must be 'dncnn' or 'drunet', got {arch!r}")
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def denoise(self, y: torch.Tensor, *, sigma: Optional[SigmaLike] = None, c: Any = None) -> torch.Tensor:
        """Denoised images [B, C, H, W]; sigma (pixel units of [0, 1]) is required for DRUNet."""
        _check_image(y, self.in_chans)
        if c is not None:
            raise ValueError(f'{self.arch} has no classifier: class-conditional denoising is not available')
        if sigma is None:
            if not self.blind:
                raise ValueError(f'{self.arch} is non-blind: denoise(y, sigma=...) needs the noise level')
            return self._denoise(y)
        return self._denoise(y, check_sigma(sigma, y.shape[0], device=y.device, dtype=y.dtype))

    def _denoise(self, y: torch.Tensor, sigma: Optional[torch.Tensor] = None, c: Any = None) -> torch.Tensor:
        """``denoise`` without the input checks (sigma already a checked tensor [B]): the training step."""
        if self.arch == 'drunet':
            if sigma is None:
                raise ValueError('drunet is non-blind: it needs the noise level')
            # DRUNet needs spatial sizes divisible by 8: pad by reflection, then crop.
            h, w = y.shape[-2:]
            ph, pw = (-h) % 8, (-w) % 8
            y_in = torch.nn.functional.pad(y, (0, pw, 0, ph), mode='reflect') if ph or pw else y
            return self.net(y_in, sigma.to(y).view(-1, 1, 1, 1))[..., :h, :w]
        return self.net(y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Blind denoising (DnCNN). DRUNet needs ``denoise(y, sigma=...)``."""
        return self.denoise(y)


def _cfg(**kwargs) -> Dict[str, Any]:
    cfg = {
        'num_classes': 0, 'input_size': (3, 32, 32), 'pool_size': None, 'crop_pct': 1.0,
        'interpolation': 'bicubic', 'mean': (0., 0., 0.), 'std': (1., 1., 1.),
        'first_conv': '', 'classifier': '', 'license': 'apache-2.0',
    }
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    'dncnn_deepinv.untrained': _cfg(),
    'drunet_deepinv.untrained': _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> DeepinvDenoiser:
    # A training config's class count (and classifier regularisers) mean nothing to a denoiser: drop them,
    # so one config serves the joint model and its denoising baselines.
    kwargs['num_classes'] = 0
    kwargs.pop('drop_rate', None)
    kwargs.pop('drop_path_rate', None)
    return build_model_with_cfg(DeepinvDenoiser, variant, pretrained, pretrained_strict=True, **kwargs)


@register_model
def dncnn_deepinv(pretrained: bool = False, **kwargs) -> DeepinvDenoiser:
    """DnCNN (Zhang et al., 2017) with deepinv's architecture: 20 layers, 64 wide, blind."""
    model_args = dict(arch='dncnn', depth=20, width=64)
    return _create('dncnn_deepinv', pretrained, **dict(model_args, **kwargs))


@register_model
def drunet_deepinv(pretrained: bool = False, **kwargs) -> DeepinvDenoiser:
    """DRUNet (Zhang et al., 2021) with deepinv's architecture: widths 64-512, 4 blocks per scale, non-blind."""
    model_args = dict(arch='drunet', width=64, num_blocks=4)
    return _create('drunet_deepinv', pretrained, **dict(model_args, **kwargs))
