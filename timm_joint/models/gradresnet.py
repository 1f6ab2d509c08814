"""GradResNet: a ResNet whose input gradient is a good denoiser (the paper's network, DESIGN §3).

Departures from ResNet, each a constructor argument so that every ablation is one flag:
    * ``act_layer``: GELU instead of ReLU (the denoiser is a gradient: it needs a smooth network);
    * ``norm_layer`` / ``norm_position``: one ``ScaleGroupNorm`` per basic block, at its end, after the
      residual addition and its GELU (the shortcut's 1x1 conv is followed by the same norm). The norm
      uses each image's own statistics and keeps the image's overall scale, so that the bias-free
      network is positively homogeneous (E(a y) = a^2 E(y) with ReLU), the property that lets its
      denoiser shrink a noisy image and generalise across noise levels;
    * ``bias``: no bias in any conv, linear or norm layer by default (D(0) = 0, Mohan et al.);
    * ``side_connections``: each stage's output, through a small bias-free 1x1 map A_s, joins the final
      features, so that in the backward pass every resolution receives its forward features (the
      skips of a UNet decoder);
    * ``stem``: '32' (3x3 conv, stride 1) or '224' (7x7 conv, stride 2), never a max-pool.

Both heads read one feature vector phi(y) (DESIGN §1, the paper's eqs. 10-12): the pooled final map
concatenated with the pooled side maps A_s f_s. The logits are W phi; the energy is quadratic in the
same maps and size-consistent (``energy_form``):
    'positions': E = 0.5 / d * sum_s sum_hw ||g_s(y)_hw||^2, summed over every position of each map;
    'pooled':    E = 0.5 / d * sum_s N_s ||mean_hw g_s(y)||^2, the paper's pooled form times the number
                 of positions N_s of each map;
with g_L = f_L (the final map), g_s = A_s f_s and d the dimension of phi (the authors' energy is half the
mean of phi's squares). Pooling and a 1x1 map commute, so the classifier's
phi is the same for both forms.

Inputs are raw [0, 1] pixels (mean 0, std 1 in the configs): a mean subtraction would be a bias.

Earlier versions of this file built another network (a plain GroupNorm that divides the scale away,
norm before the block's GELU, biases, an energy head apart from the classifier). It stays available,
flag by flag (``norm_layer='groupnorm'``, ``norm_position='end'``, ``bias=True``,
``heads='separate'``), and exports written before the architecture was named in config.json load as
that network (``LEGACY_ARGS``).
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, SelectAdaptivePool2d, get_act_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..io import PretrainedUnavailableError, check_hub_weights, is_download_error
from ..joint import EnergyHead, JointDensityMixin

__all__ = ['GradResNet', 'BasicBlock', 'ScaleGroupNorm', 'GroupNormScale', 'ScaledAct', 'ChannelCentring', 'HF_HUB_ORG', 'LEGACY_ARGS',
           'upgrade_model_args']

# The one place that names the Hugging Face Hub organisation the pretrained weights live under.
HF_HUB_ORG = 'timm-joint'

# The architecture that exports written before config.json named it were built with (the defaults of
# that version): plain GroupNorm before the block's GELU, biases, an energy head apart from the classifier.
LEGACY_ARGS = dict(norm_layer='groupnorm', norm_position='end', bias=True, heads='separate')


def _num_groups(num_channels: int, group_size: int) -> int:
    """Groups of about ``group_size`` channels: the largest divisor of C not above C // group_size, at least 1."""
    if group_size < 1:
        raise ValueError(f'group_size must be >= 1, got {group_size}')
    target = max(1, num_channels // group_size)
    return max(g for g in range(1, target + 1) if num_channels % g == 0)


class ScaleGroupNorm(nn.Module):
    """Per-image group normalisation that keeps the image's overall scale (homogeneous of degree 1).

    For each image and each group of channels: subtract the group's mean, divide by the group's standard
    deviation, then multiply by the root mean square of that image's group standard deviations. The
    groups are equalised with one another, but the image's overall scale survives: ``norm(a x) =
    a norm(x)`` for a > 0 (up to ``eps``), where a plain GroupNorm would give ``norm(x)``. A learned
    per-channel gain follows; a shift only with ``bias=True`` (a shift breaks homogeneity).

    Args:
        num_channels: Channels C.
        group_size: Channels per group (8, as the authors); the group count is the largest divisor of C
            not above C // group_size, and at least 1.
        eps: Added to the variances; relative to the features' scale, it decides where homogeneity
            holds (a * std >> sqrt(eps)).
        affine: Learn a per-channel gain.
        bias: Learn a per-channel shift too (not homogeneous; an ablation).
    """

    def __init__(
            self,
            num_channels: int,
            group_size: int = 8,
            eps: float = 1e-5,
            affine: bool = True,
            bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_channels = num_channels
        self.num_groups = _num_groups(num_channels, group_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels, **dd)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, **dd)) if affine and bias else None

    def extra_repr(self) -> str:
        return (f'{self.num_channels}, groups={self.num_groups}, eps={self.eps}, affine={self.weight is not None}, '
                f'bias={self.bias is not None}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        xg = x.reshape(b, self.num_groups, -1)
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)  # [B, G, 1]
        scale2 = var.mean(dim=1, keepdim=True)  # [B, 1, 1]: the mean of the image's group variances
        out = ((xg - mean) * torch.sqrt((scale2 + self.eps) / (var + self.eps))).reshape(x.shape)
        if self.weight is not None:
            out = out * self.weight.reshape(1, c, 1, 1)
        if self.bias is not None:
            out = out + self.bias.reshape(1, c, 1, 1)
        return out


class GroupNormScale(nn.GroupNorm):
    """A plain GroupNorm (per-group statistics divide the scale away) with a per-channel gain and,
    unless ``bias=False``, a shift: the norm of GradResNet's earlier versions (``norm_layer='groupnorm'``).

    Args:
        num_channels: Channels C.
        num_groups: Groups; reduced to the largest divisor of C not above it.
        eps: Variance epsilon.
        affine: Learn a per-channel scale.
        bias: Learn a per-channel shift too.
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
    if isinstance(cls, type) and issubclass(cls, (GroupNormScale, ScaleGroupNorm)):
        return norm_layer(num_channels, bias=bias, **dd)
    norm = norm_layer(num_channels, **dd)
    if not bias and getattr(norm, 'bias', None) is not None:
        # BatchNorm and friends: keep the scale, drop the shift (the bias-free axis).
        norm.bias = None
    return norm


class ScaledAct(nn.Module):
    """act(gain * x) / gain: the activation's transition narrowed to 1 / gain in the features' units.

    GELU bends over about one unit around 0. With a norm that keeps the image's scale, a feature map of a
    low-contrast image (a texture of pixel std 0.1) stays within that unit, where GELU is nearly linear,
    and the network cannot measure how the image's energy spreads over its filters (what telling
    textures apart needs). The gain narrows the bend without changing the output's scale (and ReLU,
    positively homogeneous, is unchanged by it).
    """

    def __init__(self, act: nn.Module, gain: float):
        super().__init__()
        self.act = act
        self.gain = float(gain)

    @classmethod
    def from_layer(cls, act_layer: Callable, gain: float) -> 'ScaledAct':
        return cls(act_layer(), gain)

    def extra_repr(self) -> str:
        return f'gain={self.gain}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x * self.gain) / self.gain


class ChannelCentring(nn.Module):
    """x_c - alpha_c * mean_hw(x_c), per image and channel, with a learned alpha (1 at initialisation).

    Linear in x (so the network stays bias-free and homogeneous). After the stem's conv it removes the
    image's mean colour from each channel, which otherwise sets every activation's operating point and
    drowns the texture's fluctuations; alpha lets training keep as much of the mean as it needs.
    """

    def __init__(self, num_channels: int, device=None, dtype=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.alpha.reshape(1, -1, 1, 1) * x.mean((2, 3), keepdim=True)


NORM_POSITIONS = ('block', 'end', 'conv')


class BasicBlock(nn.Module):
    """ResNet basic block with the norm placed by ``norm_position``:

    'block': x -> norm(act(conv2(act(conv1(x))) + shortcut(x))), the shortcut's 1x1 conv followed by the
        norm; one norm per block, at its very end (the authors' GradResNet, the default).
    'end': x -> act(norm(conv2(act(conv1(x))) + shortcut(x))), a bare 1x1 conv shortcut (earlier versions).
    'conv': x -> act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x)), a norm after every conv (ResNet).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = ScaleGroupNorm,
            norm_position: str = 'block',
            bias: bool = False,
            norm_bias: Optional[bool] = None,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        norm_bias = bias if norm_bias is None else norm_bias
        if norm_position not in NORM_POSITIONS:
            raise ValueError(f'norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}')
        self.norm_position = norm_position
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=bias, **dd)
        self.norm1 = _make_norm(norm_layer, out_chs, norm_bias, dd) if norm_position == 'conv' else nn.Identity()
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=bias, **dd)
        self.norm2 = _make_norm(norm_layer, out_chs, norm_bias, dd) if norm_position == 'conv' else nn.Identity()
        if stride != 1 or in_chs != out_chs:
            layers = [nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=bias, **dd)]
            if norm_position in ('conv', 'block'):
                layers.append(_make_norm(norm_layer, out_chs, norm_bias, dd))
            self.downsample = nn.Sequential(*layers)
        else:
            self.downsample = nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.act2 = act_layer()
        self.norm = _make_norm(norm_layer, out_chs, norm_bias, dd) if norm_position in ('end', 'block') else nn.Identity()
        self.norm_after_act = norm_position == 'block'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        x = self.drop_path(x) + shortcut
        if self.norm_after_act:
            return self.norm(self.act2(x))
        return self.act2(self.norm(x))


HEADS = ('shared', 'separate')
ENERGY_FORMS = ('positions', 'pooled')


class GradResNet(JointDensityMixin, nn.Module):
    """GradResNet: a timm classifier whose input gradient is a denoiser (the paper's network).

    Args:
        layers: Basic blocks per stage.
        channels: Widths per stage.
        num_classes: Classes of the linear head W (no bias unless ``bias``); 0 for no head.
        in_chans: Image channels.
        stem: '32' (3x3 stride-1 conv) or '224' (7x7 stride-2 conv); no max-pool either way.
        act_layer: Activation (GELU; 'relu' for the ablation).
        norm_layer: 'scalegroupnorm' (per-image, scale-preserving: the default), 'groupnorm' (a plain
            GroupNorm, earlier versions) or 'batchnorm'; or a norm class.
        group_size: Channels per group of ``ScaleGroupNorm``.
        norm_position: 'block' (one norm at the end of each block, after its GELU, and after the
            shortcut's conv), 'end' (after the addition, before the GELU) or 'conv' (after every conv).
        bias: Biases in convs, norms, side maps and the classifier (False: bias-free, D(0) = 0).
        norm_bias: Shifts in the norms (default: as ``bias``).
        side_connections: Side maps A_s of every stage but the last join the features phi.
        side_ratio: Width of each side map as a fraction of its stage's width (1/2, as the authors).
        heads: 'shared' (both heads read phi, the paper's) or 'separate' (earlier versions: the
            classifier reads the pooled final map, the energy square 1x1 maps of every stage's output).
        energy_form: 'positions' or 'pooled' (see the module docstring); both are size-consistent.
        act_gain: Every activation computes act(act_gain * x) / act_gain (``ScaledAct``); 1 for plain GELU.
        stem_centring: Subtract from each stem channel a learned fraction of its per-image spatial mean,
            before the stem's activation (``ChannelCentring``).
        energy_init_scale: Initial scale of the separate energy head's maps (``heads='separate'``).
        side_energy: Old name of ``side_connections`` (exports of earlier versions use it).
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
            norm_layer: Union[str, Callable] = 'scalegroupnorm',
            group_size: int = 8,
            norm_position: str = 'block',
            bias: bool = False,
            norm_bias: Optional[bool] = None,
            side_connections: bool = True,
            side_ratio: float = 0.5,
            heads: str = 'shared',
            energy_form: str = 'positions',
            act_gain: float = 1.,
            stem_centring: bool = False,
            energy_init_scale: float = 0.1,
            side_energy: Optional[bool] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        layers, channels = tuple(layers), tuple(channels)
        if len(layers) != len(channels) or not layers:
            raise ValueError(f'layers and channels need one entry per stage, got {layers} and {channels}')
        if str(stem) not in ('32', '224'):
            raise ValueError(f"stem must be '32' or '224', got {stem!r}")
        if heads not in HEADS:
            raise ValueError(f'heads must be one of {HEADS}, got {heads!r}')
        if energy_form not in ENERGY_FORMS:
            raise ValueError(f'energy_form must be one of {ENERGY_FORMS}, got {energy_form!r}')
        if heads == 'separate' and energy_form != 'positions':
            raise ValueError("heads='separate' has only the per-position energy (energy_form='positions')")
        if not 0 < side_ratio <= 1:
            raise ValueError(f'side_ratio must be in (0, 1], got {side_ratio}')
        if side_energy is not None:
            side_connections = side_energy
        if act_gain <= 0:
            raise ValueError(f'act_gain must be > 0, got {act_gain}')
        act_name = act_layer if isinstance(act_layer, str) else getattr(act_layer, '__name__', str(act_layer))
        norm_name = norm_layer if isinstance(norm_layer, str) else getattr(norm_layer, '__name__', str(norm_layer))
        # The constructor arguments that define the architecture: an export records them all (nanoGPT's
        # rule), so a reload rebuilds exactly this network whatever the defaults become.
        self.arch_args = dict(
            layers=list(layers), channels=list(channels), stem=str(stem), act_layer=str(act_name).lower(),
            norm_layer=str(norm_name), group_size=group_size, norm_position=norm_position, bias=bias,
            norm_bias=bias if norm_bias is None else norm_bias, side_connections=side_connections,
            side_ratio=side_ratio, heads=heads, energy_form=energy_form, act_gain=act_gain,
            stem_centring=stem_centring)
        act_layer = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        if act_gain != 1.:
            act_layer = partial(ScaledAct.from_layer, act_layer, act_gain)
        norm_layer = _resolve_norm(norm_layer, group_size)
        norm_bias = bias if norm_bias is None else norm_bias
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.heads = heads
        self.energy_form = energy_form
        self.side_connections = side_connections
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
        if stem_centring:
            stem_layers.append(ChannelCentring(channels[0], **dd))
        stem_layers.append(act_layer())
        self.stem = nn.Sequential(*stem_layers)
        self.feature_info = [dict(num_chs=channels[0], reduction=stem_stride, module=f'stem.{len(stem_layers) - 1}')]

        # Pure Python (not torch.linspace): the model must build on the meta device.
        n_blocks = sum(layers)
        dpr = [drop_path_rate * i / max(1, n_blocks - 1) for i in range(n_blocks)]
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

        if heads == 'shared':
            # Side maps A_s of every stage but the last (1x1, bias-free unless ``bias``).
            side_chs = [max(1, int(round(c * side_ratio))) for c in channels[:-1]] if side_connections else []
            self.side = nn.ModuleList([nn.Conv2d(c, s, 1, bias=bias, **dd) for c, s in zip(channels, side_chs)])
            self.num_features = self.head_hidden_size = channels[-1] + sum(side_chs)
            self.energy_head = None
            # The authors' E = 0.5 * mean of the d squared features: 1 / d, fixed at construction.
            self.energy_scale = 1. / self.num_features
        else:
            self.side = nn.ModuleList()
            self.num_features = self.head_hidden_size = channels[-1]
            energy_chs = list(channels) if side_connections else [channels[-1]]
            self.energy_head = EnergyHead(energy_chs, init_scale=energy_init_scale, **dd)

        self.global_pool = _make_pool(global_pool)
        self.fc = nn.Linear(self.num_features, num_classes, bias=bias, **dd) if num_classes > 0 else nn.Identity()
        self._fc_bias = bias
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        for m in self.side:
            if not m.weight.is_meta:
                # Unit gain: a side map passes its stage's features on at their own scale.
                nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)
        if self.energy_head is not None:
            self.energy_head.reset_parameters()  # the separate energy maps have an init of their own

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

        Returns:
            The intermediates, or (the features ``forward_head`` takes, the intermediates).
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        maps = []
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            maps.append(x)
            if i + 1 in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return (self._merge(maps) if len(maps) == len(self.stages) else x), intermediates

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
            # Keep both heads functions of what is left: the last kept stage is now the final map, and
            # the side maps of the stages before it stay.
            n_side = max(0, max_index - 1) if len(self.side) else 0
            self.side = self.side[:n_side]
            last = self.feature_info[max_index]['num_chs']
            self.num_features = self.head_hidden_size = last + sum(m.out_channels for m in self.side)
            if self.heads == 'shared':
                self.energy_scale = 1. / self.num_features  # E stays half the mean of phi's squares
            if self.energy_head is not None:
                n_keep = max_index if self.side_connections else 0
                self.energy_head.maps = self.energy_head.maps[:n_keep]
                self.energy_head.in_channels = self.energy_head.in_channels[:n_keep]
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def stage_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The output f_s [B, C_s, H_s, W_s] of every stage, for images x [B, C, H, W]."""
        x = self.stem(x)
        maps: List[torch.Tensor] = []
        for stage in self.stages:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            maps.append(x)
        return maps

    def _merge(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """The final map with each side map A_s pool(f_s) broadcast over its positions [B, d, H', W'].

        The side channels are constant over positions, so that pooling this map gives phi exactly, for
        any image size (an average pooling of A_s f_s to the final map's size would not, when the sizes
        do not divide); the stage maps themselves are what ``forward_intermediates`` returns.
        """
        last = maps[-1]
        if self.heads != 'shared':
            return last
        out = [last]
        for i, side in enumerate(self.side):
            out.append(side(maps[i].mean((2, 3), keepdim=True)).expand(-1, -1, last.shape[2], last.shape[3]))
        return torch.cat(out, 1)

    def energy_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The maps g_s the energy squares: the final map and each side map A_s f_s, each at its own
        resolution (or, with ``heads='separate'``, the separate head's maps of each stage)."""
        return self._energy_maps(self.stage_maps(x))

    def _energy_maps(self, maps: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.energy_head is not None:
            return self.energy_head(maps if self.side_connections else maps[-1:])
        out = [maps[-1]]
        for i, side in enumerate(self.side):
            out.append(side(maps[i]))
        return out

    def joint_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One pass for both heads: (the map ``forward_head`` pools [B, d, H', W'], the energy's maps)."""
        maps = self.stage_maps(x)
        g = self._energy_maps(maps)
        if self.energy_head is not None:
            return maps[-1], g
        # A 1x1 map and pooling commute: pool(A_s f_s) = A_s pool(f_s), the side features of _merge.
        h, w = g[0].shape[2], g[0].shape[3]
        return torch.cat([g[0]] + [t.mean((2, 3), keepdim=True).expand(-1, -1, h, w) for t in g[1:]], 1), g

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features phi before pooling [B, num_features, H', W']: the final map and the side maps."""
        return self._merge(self.stage_maps(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features phi(y) [B, num_features] if ``pre_logits``, else logits W phi [B, num_classes]."""
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


def _resolve_norm(norm_layer: Union[str, Callable], group_size: int) -> Callable:
    if not isinstance(norm_layer, str):
        return norm_layer
    name = norm_layer.lower().replace('_', '')
    if name in ('scalegroupnorm', 'sgn'):
        return partial(ScaleGroupNorm, group_size=group_size)
    if name in ('scalegroupnormnoaffine',):
        return partial(ScaleGroupNorm, group_size=group_size, affine=False)
    if name in ('groupnorm', 'gn', 'groupnormscale'):
        return GroupNormScale
    if name in ('groupnormnoaffine', 'gnnoaffine'):
        return partial(GroupNormScale, affine=False)
    if name in ('batchnorm', 'batchnorm2d', 'bn'):
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm_layer {norm_layer!r}: expected 'scalegroupnorm', 'groupnorm', "
                     f"'groupnorm_noaffine' or 'batchnorm'")


def upgrade_model_args(model_args: Dict[str, Any], architecture: str = 'gradresnet') -> Dict[str, Any]:
    """The constructor arguments recorded in an export's config.json, with the earlier architecture
    filled in when the export predates the naming of the architecture (no ``heads`` key): such an
    export was built by a version whose defaults were ``LEGACY_ARGS``, and its weights fit only that
    network. Arguments of other architectures are returned unchanged.

    Args:
        model_args: The ``model_args`` of config.json.
        architecture: Its ``architecture`` (a registered name, with or without a tag).
    """
    args = dict(model_args)
    if architecture.split('.')[0].startswith('gradresnet') and 'heads' not in args:
        for key, value in LEGACY_ARGS.items():
            args.setdefault(key, value)
    return args


# What to do when the registry's weights cannot be had; ends every such message.
_PRETRAINED_HINT = ("Load a folder this project wrote with timm.create_model('local-dir:PATH', pretrained=True), "
                    'or train one with train_joint.py (README: Pretrained weights).')


def _check_pretrained(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Fail in seconds, with one message, when the registry's weights of ``variant`` are not on the Hub.

    Weights timm would take from the Hugging Face Hub are asked for once, without retries
    (``io.check_hub_weights``), before timm's own download (which retries each file five times). When
    the Hub cannot be reached but the weights are cached, timm is pointed at the cached file.

    Returns:
        ``kwargs``, with a ``pretrained_cfg_overlay`` naming the cached file in that last case.
    """
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from != 'hf-hub':
        return kwargs  # a local file or folder: timm's loader says what is wrong with it
    hub_id, filename = location if isinstance(location, tuple) else (location, None)
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    cached = check_hub_weights(hub_id, model=name, hint=_PRETRAINED_HINT,
                               **({'filenames': (filename,)} if filename else {}))
    if cached is not None and cfg.source != 'hf-hub':
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=cached)
        kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
    return kwargs


def _create_gradresnet(variant: str, pretrained: bool = False, **kwargs) -> GradResNet:
    cfg = kwargs.get('pretrained_cfg')
    if isinstance(cfg, dict) and cfg.get('source') in ('local-dir', 'hf-hub'):
        # Model arguments read from an export's config.json: an old one does not name the architecture.
        kwargs = upgrade_model_args(kwargs, variant)
    if pretrained:
        kwargs = _check_pretrained(variant, kwargs)
    # features_only: by default every feature (stem + each stage); timm's default (0..4) assumes 4 stages.
    num_stages = len(kwargs.get('layers', (2, 2, 2, 2)))
    try:
        return build_model_with_cfg(
            GradResNet, variant, pretrained,
            feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_stages + 1))),
            **kwargs,
        )
    except Exception as e:
        if not pretrained or not is_download_error(e):
            raise
        hub_id = _resolve_hub_id(variant, cfg)
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise PretrainedUnavailableError(
            f'could not load pretrained weights for {variant!r} from the Hugging Face Hub repo '
            f'{hub_id!r} ({type(e).__name__}: {first_line}). {_PRETRAINED_HINT}') from None


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
