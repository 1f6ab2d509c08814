"""GradResNet: a ResNet whose input gradient is a good denoiser.

Departures from ResNet (each a constructor argument, so every ablation is one flag):
    * ``act_layer``: GELU instead of ReLU (the denoiser is a gradient, it needs a smooth network);
    * ``norm_layer`` / ``norm_position``: one GroupNorm per basic block, after the residual addition
      ('end'), instead of a BatchNorm after every conv ('conv');
    * ``bias``: biases in convs, norms and the classifier (the default, measured best here); ``False``
      gives the bias-free network of Mohan et al., for which D(0) = 0;
    * ``side_energy``: energy terms on every stage's output, so that in the backward pass every
      resolution receives its forward features, as a UNet decoder receives skips;
    * ``stem``: '32' (3x3 conv, stride 1) or '224' (7x7 conv, stride 2), never a max-pool.

Inputs are raw [0, 1] pixels (mean 0, std 1 in the configs), so the bias-free ablation stays bias-free.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, SelectAdaptivePool2d, get_act_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..joint import EnergyHead, JointDensityMixin

__all__ = ['GradResNet', 'BasicBlock', 'GroupNormScale', 'HF_HUB_ORG']

# The one place that names the Hugging Face Hub organisation the pretrained weights live under.
HF_HUB_ORG = 'timm-joint'


class GroupNormScale(nn.GroupNorm):
    """GroupNorm with a per-channel scale and, unless ``bias=True``, no shift.

    Args:
        num_channels: Channels C.
        num_groups: Groups; reduced to the largest divisor of C not above it.
        eps: Variance epsilon.
        affine: Learn a per-channel scale.
        bias: Learn a per-channel shift too (GradResNet's default; off in the bias-free ablation).
    """

    def __init__(
            self,
            num_channels: int,
            num_groups: int = 32,
            eps: float = 1e-5,
            affine: bool = True,
            bias: bool = False,
            device=None,
            dtype=None,
    ):
        groups = max(g for g in range(1, min(num_groups, num_channels) + 1) if num_channels % g == 0)
        super().__init__(groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        if affine and not bias:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _make_norm(norm_layer: Callable, num_channels: int, bias: bool, dd: Dict[str, Any]) -> nn.Module:
    cls = norm_layer.func if isinstance(norm_layer, partial) else norm_layer
    if isinstance(cls, type) and issubclass(cls, GroupNormScale):
        return norm_layer(num_channels, bias=bias, **dd)
    norm = norm_layer(num_channels, **dd)
    if not bias and getattr(norm, 'bias', None) is not None:
        # BatchNorm and friends: keep the scale, drop the shift (the bias-free ablation axis).
        norm.bias = None
    return norm


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3 - act - conv3x3 (+ shortcut), with the norm placed by ``norm_position``.

    'end': x -> act(norm(conv2(act(conv1(x))) + shortcut(x))), one norm per block (GradResNet).
    'conv': x -> act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x)), a norm after every conv (ResNet).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = GroupNormScale,
            norm_position: str = 'end',
            bias: bool = False,
            norm_bias: Optional[bool] = None,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        norm_bias = bias if norm_bias is None else norm_bias
        if norm_position not in ('end', 'conv'):
            raise ValueError(f"norm_position must be 'end' or 'conv', got {norm_position!r}")
        self.norm_position = norm_position
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=bias, **dd)
        self.norm1 = _make_norm(norm_layer, out_chs, norm_bias, dd) if norm_position == 'conv' else nn.Identity()
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=bias, **dd)
        self.norm2 = _make_norm(norm_layer, out_chs, norm_bias, dd) if norm_position == 'conv' else nn.Identity()
        if stride != 1 or in_chs != out_chs:
            layers = [nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=bias, **dd)]
            if norm_position == 'conv':
                layers.append(_make_norm(norm_layer, out_chs, norm_bias, dd))
            self.downsample = nn.Sequential(*layers)
        else:
            self.downsample = nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm = _make_norm(norm_layer, out_chs, norm_bias, dd) if norm_position == 'end' else nn.Identity()
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        x = self.drop_path(x) + shortcut
        x = self.norm(x)
        return self.act2(x)


class GradResNet(JointDensityMixin, nn.Module):
    """GradResNet: a timm classifier with a quadratic energy head, hence a denoiser.

    Args:
        layers: Basic blocks per stage.
        channels: Widths per stage.
        num_classes: Classes of the linear head (no bias unless ``bias``); 0 for no head.
        in_chans: Image channels.
        stem: '32' (3x3 stride-1 conv) or '224' (7x7 stride-2 conv); no max-pool either way.
        act_layer: Activation (GELU; ReLU for the ablation).
        norm_layer: Norm (GroupNorm; BatchNorm2d for the ablation).
        norm_position: 'end' (one norm per block, after the addition) or 'conv' (after every conv).
        bias: Biases in convs, norms and the classifier (False: the bias-free ablation, D(0) = 0).
        norm_bias: Shifts in the norms (default: as ``bias``), to ablate the norms' shifts apart
            from the conv and classifier biases.
        side_energy: Energy terms on every stage's output (side connections), not only the last.
        energy_init_scale: Initial scale of the energy head's 1x1 maps.
        global_pool: Classifier pooling type.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, linearly increasing over blocks.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (2, 2, 2, 2),
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            num_classes: int = 1000,
            in_chans: int = 3,
            stem: str = '32',
            act_layer: Union[str, Type[nn.Module]] = 'gelu',
            norm_layer: Union[str, Callable] = 'groupnorm',
            norm_position: str = 'end',
            bias: bool = True,
            norm_bias: Optional[bool] = None,
            side_energy: bool = True,
            energy_init_scale: float = 0.1,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if len(layers) != len(channels) or not layers:
            raise ValueError(f'layers and channels need one entry per stage, got {layers} and {channels}')
        if str(stem) not in ('32', '224'):
            raise ValueError(f"stem must be '32' or '224', got {stem!r}")
        act_layer = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        norm_layer = _resolve_norm(norm_layer)
        norm_bias = bias if norm_bias is None else norm_bias
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.side_energy = side_energy
        self.grad_checkpointing = False

        # Stem: no max-pool (it is not smooth); the 224 px stem halves the resolution by its stride.
        if str(stem) == '32':
            stem_conv = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=bias, **dd)
            stem_stride = 1
        else:
            stem_conv = nn.Conv2d(in_chans, channels[0], 7, stride=2, padding=3, bias=bias, **dd)
            stem_stride = 2
        stem_layers = [stem_conv]
        if norm_position == 'conv':
            stem_layers.append(_make_norm(norm_layer, channels[0], norm_bias, dd))
        stem_layers.append(act_layer())
        self.stem = nn.Sequential(*stem_layers)
        self.feature_info = [dict(num_chs=channels[0], reduction=stem_stride, module=f'stem.{len(stem_layers) - 1}')]

        dpr = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        stages, in_chs, reduction, block_idx = [], channels[0], stem_stride, 0
        for i, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(
                    in_chs, out_chs, stride=stride if j == 0 else 1, act_layer=act_layer,
                    norm_layer=norm_layer, norm_position=norm_position, bias=bias, norm_bias=norm_bias,
                    drop_path_rate=dpr[block_idx], **dd))
                in_chs, block_idx = out_chs, block_idx + 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = channels[-1]

        self.global_pool = _make_pool(global_pool)
        self.fc = nn.Linear(self.num_features, num_classes, bias=bias, **dd) if num_classes > 0 else nn.Identity()
        self._fc_bias = bias
        energy_chs = list(channels) if side_energy else [channels[-1]]
        self.energy_head = EnergyHead(energy_chs, init_scale=energy_init_scale, **dd)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        self.energy_head.reset_parameters()  # the energy maps have an init of their own

    # -- timm model API ------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        # Non-reentrant checkpointing (timm's default) supports the double backward of the loss.
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _make_pool(global_pool)
        ref = next(self.parameters())  # the new head lives where the model lives (meta, float64...)
        self.fc = (nn.Linear(self.num_features, num_classes, bias=self._fc_bias, device=ref.device, dtype=ref.dtype)
                   if num_classes > 0 else nn.Identity())
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stem and stage outputs.

        Args:
            x: Images [B, C, H, W].
            indices: Last n features if int, all if None, else the listed ones (0 is the stem).
            norm: Unused (each block already ends with a norm).
            stop_early: Stop after the last requested feature.
            output_fmt: 'NCHW' only.
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if i + 1 in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) after the last requested intermediate."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            # Keep the energy a function of what is left: the side terms of the kept stages; without
            # side terms the final-map term is gone too (energy_head then raises a clear error).
            n_keep = max_index if self.side_energy else 0
            self.energy_head.maps = self.energy_head.maps[:n_keep]
            self.energy_head.in_channels = self.energy_head.in_channels[:n_keep]
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def energy_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The maps f_s the energy is summed over: each stage's output, or only the last."""
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            maps.append(x)
        return maps if self.side_energy else maps[-1:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map [B, num_features, H', W'] (the un-pooled f(y))."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features phi(y) [B, num_features] if ``pre_logits``, else logits [B, num_classes]."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] of images [B, C, H, W] with pixels in [0, 1]."""
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _make_pool(global_pool: str) -> SelectAdaptivePool2d:
    # Flatten only after an actual pooling: with global_pool='' the head passes the map through
    # [B, C, H, W] (timm's convention, checked by its default-cfg test).
    return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))


def _resolve_norm(norm_layer: Union[str, Callable]) -> Callable:
    if not isinstance(norm_layer, str):
        return norm_layer
    name = norm_layer.lower().replace('_', '')
    if name in ('groupnorm', 'gn'):
        return GroupNormScale
    if name in ('groupnormnoaffine', 'gnnoaffine'):
        return partial(GroupNormScale, affine=False)
    if name in ('batchnorm', 'batchnorm2d', 'bn'):
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm_layer {norm_layer!r}: expected 'groupnorm', 'groupnorm_noaffine' or 'batchnorm'")


def _create_gradresnet(variant: str, pretrained: bool = False, **kwargs) -> GradResNet:
    # features_only: by default every feature (stem + each stage); timm's default (0..4) assumes 4 stages.
    num_stages = len(kwargs.get('layers', (2, 2, 2, 2)))
    try:
        return build_model_with_cfg(
            GradResNet, variant, pretrained,
            feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_stages + 1))),
            **kwargs,
        )
    except Exception as e:
        if not pretrained or not _is_download_error(e):
            raise
        cfg = kwargs.get('pretrained_cfg')
        hub_id = _resolve_hub_id(variant, cfg)
        raise RuntimeError(
            f'could not load pretrained weights for {variant!r} from the Hugging Face Hub repo '
            f'{hub_id!r} ({type(e).__name__}: {e}). The weights may not be published yet, or the Hub '
            f'is unreachable (offline). Load a folder this project wrote with '
            f"timm.create_model('local-dir:PATH', pretrained=True), or train one with "
            f'train_joint.py (README: Pretrained weights).') from e


def _is_download_error(e: Exception) -> bool:
    # Errors of huggingface_hub and its HTTP clients, and OS-level ones (no network, no cache).
    mod = type(e).__module__ or ''
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or mod.split('.')[0] in (
        'huggingface_hub', 'requests', 'httpx', 'urllib3', 'httpcore')


def _resolve_hub_id(variant: str, cfg: Any) -> str:
    if isinstance(cfg, dict) and cfg.get('hf_hub_id'):
        return cfg['hf_hub_id']
    if hasattr(cfg, 'hf_hub_id') and cfg.hf_hub_id:
        return cfg.hf_hub_id
    from timm.models import get_pretrained_cfg
    name = f'{variant}.{cfg}' if isinstance(cfg, str) else variant
    resolved = get_pretrained_cfg(name)
    return getattr(resolved, 'hf_hub_id', None) or f'{HF_HUB_ORG}/{variant}'


def _cfg(stem: str = '32', **kwargs) -> Dict[str, Any]:
    size = 32 if stem == '32' else 224
    reduction = 8 if stem == '32' else 16
    cfg = {
        'num_classes': 10 if stem == '32' else 1000,
        'input_size': (3, size, size), 'pool_size': (size // reduction, size // reduction),
        'crop_pct': 1.0 if stem == '32' else 0.875, 'interpolation': 'bicubic',
        'mean': (0., 0., 0.), 'std': (1., 1., 1.),
        'first_conv': 'stem.0', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2410.03505',
        'paper_name': 'Classification-denoising networks',
    }
    cfg.update(kwargs)
    return cfg


def _hub(name: str) -> str:
    return f'{HF_HUB_ORG}/{name}'


# default_cfgs must exist before the entry points below are registered.
default_cfgs = generate_default_cfgs({
    'gradresnet18_joint.cifar10': _cfg(hf_hub_id=_hub('gradresnet18_joint.cifar10')),
    'gradresnet18_joint_224.in1k': _cfg(stem='224', hf_hub_id=_hub('gradresnet18_joint_224.in1k')),
    'gradresnet10_joint.cifar10': _cfg(hf_hub_id=_hub('gradresnet10_joint.cifar10')),
    'gradresnet_tiny_joint.cifar10': _cfg(pool_size=(8, 8), hf_hub_id=_hub('gradresnet_tiny_joint.cifar10')),
})


@register_model
def gradresnet18_joint(pretrained: bool = False, **kwargs) -> GradResNet:
    """GradResNet18 for 32 px images (3x3 stride-1 stem), the paper's CIFAR-10 model."""
    model_args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), stem='32')
    return _create_gradresnet('gradresnet18_joint', pretrained, **dict(model_args, **kwargs))


@register_model
def gradresnet18_joint_224(pretrained: bool = False, **kwargs) -> GradResNet:
    """GradResNet18 for 224 px images (7x7 stride-2 stem, no max-pool), the paper's ImageNet model."""
    model_args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), stem='224')
    return _create_gradresnet('gradresnet18_joint_224', pretrained, **dict(model_args, **kwargs))


@register_model
def gradresnet10_joint(pretrained: bool = False, **kwargs) -> GradResNet:
    """GradResNet10 for 32 px images: one block per stage, half width; trains in minutes on a CPU."""
    model_args = dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem='32')
    return _create_gradresnet('gradresnet10_joint', pretrained, **dict(model_args, **kwargs))


@register_model
def gradresnet_tiny_joint(pretrained: bool = False, **kwargs) -> GradResNet:
    """A three-stage, 16-64 wide GradResNet for 32 px images: tests and the offline quickstart."""
    model_args = dict(layers=(1, 1, 1), channels=(16, 32, 64), stem='32')
    return _create_gradresnet('gradresnet_tiny_joint', pretrained, **dict(model_args, **kwargs))
