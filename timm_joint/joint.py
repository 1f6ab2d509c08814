"""The joint density log p_sigma(y, c) around a classifier: one implementation of the maths.

A network with logits l(y) and energy maps g_s(y) defines (DESIGN §1)

    E(y)                  = 0.5 * sum_s sum_hw ||g_s(y)_hw||^2   ('positions')      (energy, >= 0)
                         or 0.5 * sum_s N_s ||mean_hw g_s(y)||^2  ('pooled', N_s positions of map s)
    log p_sigma(y)        = -E(y) / sigma^2 + const                          (unnormalised)
    log p_sigma(y, c)     = -E(y) / sigma^2 + log_softmax(l(y))_c + const
    D(y)                  = y - grad_y E(y)                                  (blind denoiser)
    D(y, c)               = y + sigma^2 grad_y log p_sigma(y, c)             (class-conditional)
    D(y, c) - D(y)        = sigma^2 grad_y log p(c | y)                      (the paper's eq. 9)

Both forms grow with the number of positions, so the denoiser's per-pixel gain does not depend on the
image size. ``JointDensityMixin`` implements all of it on top of hooks of the host module:
``forward_features``, ``forward_head``, ``energy_maps(y)`` (the maps g_s) and ``joint_features(y)``
(the map ``forward_head`` pools and the energy maps, from one pass), and an ``energy_form``.
``GradResNet`` inherits it; ``JointDensityWrapper`` brings it to any timm classifier.

Inputs are checked at the public methods (shape, dtype, finiteness, sigma, class range); the training
objective calls the unchecked ``_denoise``, since a data-dependent check syncs the device every step.
"""
import copy
import numbers
import warnings
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .noise import SigmaLike, check_sigma

__all__ = ['JointDensityMixin', 'JointDensityWrapper', 'PixelInput', 'EnergyHead', 'energy_of_maps', 'energy_map_grads']

ClassLike = Union[int, torch.Tensor]
ENERGY_FORMS = ('positions', 'pooled')


class EnergyHead(nn.Module):
    """Bias-free 1x1 maps A_s, one per feature map: g_s = A_s f_s, whose squares make the energy.

    Used where the classifier's features have no maps of their own for the energy: around a wrapped timm
    classifier (one map on the final features) and in GradResNet's earlier ``heads='separate'``. The
    maps run in at least float32, with autocast off (float64 maps stay float64), so the energy of a
    bf16/fp16 backbone is not rounded.

    Args:
        in_channels: Channels of each feature map f_s.
        init_scale: Scale of A_s at initialisation: with unit-variance features, ||A f||^2 per
            position starts near init_scale^2, whatever the width.
        init: 'orthogonal' (A_s = init_scale / sqrt(C) times an orthogonal matrix) or 'normal'
            (i.i.d. N(0, (init_scale / C)^2) entries, the same scale in expectation). Use 'normal'
            when the features end with a per-position normalisation (LayerNorm, RMSNorm: most
            token models): ||f_hw|| is then constant, so with A^T A proportional to I the energy is
            constant and D(y) = y at initialisation, with no gradient reaching the backbone.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            init_scale: float = 0.1,
            init: str = 'orthogonal',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if init not in ('orthogonal', 'normal'):
            raise ValueError(f"init must be 'orthogonal' or 'normal', got {init!r}")
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = list(in_channels)
        self.init_scale = init_scale
        self.init = init
        self.maps = nn.ModuleList([nn.Conv2d(c, c, 1, bias=False, **dd) for c in self.in_channels])
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.maps:
            if m.weight.is_meta:
                continue
            c = m.weight.shape[0]
            w = torch.empty(c, c, dtype=torch.float32)
            if self.init == 'orthogonal':
                nn.init.orthogonal_(w)
                w = w * self.init_scale / c ** 0.5
            else:
                nn.init.normal_(w, std=self.init_scale / c)
            with torch.no_grad():
                m.weight.copy_(w.view(c, c, 1, 1))

    def forward(self, maps: List[torch.Tensor]) -> List[torch.Tensor]:
        """Args: maps: feature maps f_s [B, C_s, H_s, W_s].

        Returns: the maps A_s f_s [B, C_s, H_s, W_s], float32 (float64 for float64 maps).
        """
        if len(self.maps) == 0:
            raise ValueError('the energy head has no feature maps (was the model pruned?)')
        if len(maps) != len(self.maps):
            raise ValueError(f'expected {len(self.maps)} feature maps, got {len(maps)}')
        autocast = False if torch.jit.is_scripting() else _autocast_enabled(maps[0].device.type)
        out: List[torch.Tensor] = []
        for i, a in enumerate(self.maps):
            f = maps[i]
            dtype = torch.promote_types(f.dtype, torch.float32)
            if autocast:
                with torch.autocast(device_type=f.device.type, enabled=False):
                    out.append(F.conv2d(f.to(dtype), a.weight.to(dtype)))
            else:
                out.append(F.conv2d(f.to(dtype), a.weight.to(dtype)))
        return out


def energy_of_maps(maps: List[torch.Tensor], form: str = 'positions', scale: float = 1.) -> torch.Tensor:
    """E = scale * 0.5 * sum_s sum_hw ||g_s,hw||^2 ('positions') or scale * 0.5 * sum_s N_s ||mean_hw g_s||^2
    ('pooled').

    Args:
        maps: The energy maps g_s [B, C_s, H_s, W_s] (or [B, C_s, N_s]).
        form: 'positions' or 'pooled'.
        scale: A constant factor (GradResNet: 1 / d, the authors' mean over the d features).

    Returns:
        E [B] in at least float32 (float64 for float64 maps), computed with autocast off.
    """
    if form not in ENERGY_FORMS:
        raise ValueError(f'energy form must be one of {ENERGY_FORMS}, got {form!r}')
    energy: Optional[torch.Tensor] = None
    device_type = maps[0].device.type
    with torch.autocast(device_type=device_type, enabled=False) if _autocast_enabled(device_type) else nullcontext():
        for g in maps:
            g = g.flatten(2).to(torch.promote_types(g.dtype, torch.float32))  # [B, C, N]
            if form == 'positions':
                e = (0.5 * scale) * g.pow(2).sum((1, 2))
            else:
                e = (0.5 * scale * g.shape[-1]) * g.mean(-1).pow(2).sum(1)
            energy = e if energy is None else energy + e
    return energy


def energy_map_grads(maps: List[torch.Tensor], form: str = 'positions', scale: float = 1.) -> List[torch.Tensor]:
    """dE/dg_s for each energy map, in closed form (the energy itself is not needed): scale * g_s
    ('positions'), or scale times its mean over positions, at every position ('pooled'). In each map's
    dtype."""
    if form == 'positions':
        return [g * scale for g in maps] if scale != 1. else list(maps)
    # The mean over positions (every dim after channels: [B, C, H, W] or [B, C, N]), at every position.
    return [(g.flatten(2).mean(-1) * scale).reshape(*g.shape[:2], *(1,) * (g.dim() - 2)).expand_as(g)
            for g in maps]


@torch.jit.unused
def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError):  # a device type autocast does not know (e.g. 'meta')
        return False


def _real_dtype(y: torch.Tensor) -> torch.dtype:
    """The dtype the joint maths runs in for input y: float32, or float64 for float64 inputs."""
    return torch.promote_types(y.dtype, torch.float32)


def _check_image(y: Any, in_chans: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f'expected an image tensor [B, {in_chans}, H, W], got {type(y).__name__}')
    if not y.is_floating_point():
        raise TypeError(
            f'expected a floating-point image tensor with pixels in [0, 1], got dtype {y.dtype}: '
            f'convert to float in [0, 1] first (e.g. y.float() / 255)')
    if y.ndim != 4 or y.shape[1] != in_chans:
        raise ValueError(
            f'expected an image tensor of shape [B, {in_chans}, H, W], got {list(y.shape)}')
    if not bool(torch.isfinite(y).all()):
        raise ValueError('the image contains NaN or inf values; expected finite pixels in [0, 1]')
    return y


class JointDensityMixin:
    """Joint-density methods for a timm classifier.

    The host defines ``forward_features(y)``, ``forward_head(x, pre_logits=False)``,
    ``energy_maps(y) -> List[Tensor]`` (the maps g_s the energy squares), ``joint_features(y)`` (the
    map ``forward_head`` takes and the energy maps, from one pass), ``energy_form`` ('positions' or
    'pooled'), ``energy_scale`` (a constant factor of E), ``num_classes`` and ``in_chans``. Inputs y are noisy images [B, C, H, W] with pixels in
    [0, 1].
    """

    energy_form: str = 'positions'
    energy_scale: float = 1.
    # The denoiser protocol (timm_joint.protocol): D(y) = y - grad E(y) needs no noise level.
    blind: bool = True

    # -- forward passes -------------------------------------------------------------------------

    def forward_joint(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One forward pass for both heads.

        Args:
            y: Images [B, C, H, W].

        Returns:
            (logits [B, num_classes], energy [B]).
        """
        x, maps = self.joint_features(y)
        return self.forward_head(x), energy_of_maps(maps, self.energy_form, self.energy_scale)

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """E(y) >= 0, [B]; -E(y) / sigma^2 is the unnormalised log p_sigma(y)."""
        _check_image(y, self.in_chans)
        return self._energy(y)

    def _energy(self, y: torch.Tensor) -> torch.Tensor:
        return energy_of_maps(self.energy_maps(y), self.energy_form, self.energy_scale)

    def log_prob(self, y: torch.Tensor, *, sigma: SigmaLike, c: Optional[ClassLike] = None) -> torch.Tensor:
        """Unnormalised log p_sigma(y) (c None) or log p_sigma(y, c), [B].

        Values compare images at one sigma, not across sigma, and are never a likelihood: the
        normalising constant Z(sigma) is unknown (DESIGN §1).

        Args:
            y: Noisy images [B, C, H, W], pixels in [0, 1].
            sigma: Noise level in pixel units of [0, 1] images, a float or a tensor [B].
            c: Class, an int or a LongTensor [B]; None for the marginal.
        """
        _check_image(y, self.in_chans)
        sigma_t = check_sigma(sigma, y.shape[0], device=y.device, dtype=_real_dtype(y))
        c_t = self._check_class(c, y.shape[0], y.device) if c is not None else None
        return self._log_prob(y, sigma_t, c_t)

    def _log_prob(self, y: torch.Tensor, sigma: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        if c is None:
            return -self._energy(y) / sigma.pow(2)
        logits, energy = self.forward_joint(y)
        log_p_c = F.log_softmax(logits.to(_real_dtype(logits)), dim=-1).gather(1, c[:, None])[:, 0]
        return -energy / sigma.pow(2) + log_p_c

    def score(self, y: torch.Tensor, *, sigma: SigmaLike, c: Optional[ClassLike] = None) -> torch.Tensor:
        """grad_y log p_sigma(y[, c]) = (D(y[, c]) - y) / sigma^2, [B, C, H, W]."""
        _check_image(y, self.in_chans)
        sigma_t = check_sigma(sigma, y.shape[0], device=y.device, dtype=_real_dtype(y))
        c_t = self._check_class(c, y.shape[0], y.device) if c is not None else None
        with self._input_grad(y) as (y_in, create_graph):
            lp = self._log_prob(y_in, sigma_t, c_t)
            (g,) = torch.autograd.grad(lp.sum(), y_in, create_graph=create_graph)
            return g

    def denoise(
            self,
            y: torch.Tensor,
            *,
            sigma: Optional[SigmaLike] = None,
            c: Optional[ClassLike] = None,
    ) -> torch.Tensor:
        """Denoise: blind D(y) = y - grad E(y), or class-conditional D(y, c) when c is given.

        The blind denoiser needs no sigma (a given one is validated, then unused). D(y, c) is
        y + sigma^2 grad_y log p_sigma(y, c), from ``log_prob`` in one autograd call.

        Works under ``torch.no_grad()`` (grad is re-enabled inside); builds a graph only when the
        model is training or y requires grad, so losses, attacks and solvers see true gradients.

        Args:
            y: Noisy images [B, C, H, W], pixels in [0, 1].
            sigma: Noise level (pixel units), a float or a tensor [B]; required with c.
            c: Class, an int or a LongTensor [B].

        Returns:
            Denoised images [B, C, H, W] (not clamped).
        """
        _check_image(y, self.in_chans)
        sigma_t = None if sigma is None else check_sigma(sigma, y.shape[0], device=y.device, dtype=_real_dtype(y))
        if c is None:
            return self._denoise(y)
        if sigma_t is None:
            raise ValueError('class-conditional denoising needs the noise level: denoise(y, sigma=..., c=...)')
        return self._denoise(y, sigma_t, self._check_class(c, y.shape[0], y.device))

    def _denoise(self, y: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                 c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``denoise`` without the input checks (sigma [B] and c [B] already checked): the training step."""
        if c is None:
            with self._input_grad(y) as (y_in, create_graph):
                # grad_y E by the chain rule from dE/dg_s in closed form: the energy itself is not needed.
                maps = self.energy_maps(y_in)
                grads = energy_map_grads(maps, self.energy_form, self.energy_scale)
                if not create_graph:
                    grads = [g.detach() for g in grads]
                (g,) = torch.autograd.grad(maps, y_in, grad_outputs=grads, create_graph=create_graph)
                # Inside the grad-enabled context: when a graph was built, the output carries it,
                # even under torch.no_grad() (y_in is y itself when y requires grad).
                return y - g.to(y.dtype)
        assert sigma is not None
        with self._input_grad(y) as (y_in, create_graph):
            lp = self._log_prob(y_in, sigma, c)
            (g,) = torch.autograd.grad(lp.sum(), y_in, create_graph=create_graph)
            return y + sigma.pow(2).view(-1, 1, 1, 1).to(g) * g.to(y.dtype)

    def adversarial_gradient(self, y: torch.Tensor, *, c: ClassLike) -> torch.Tensor:
        """grad_y log p(c | y), [B, C, H, W]; equals (D(y, c) - D(y)) / sigma^2 for every sigma."""
        _check_image(y, self.in_chans)
        c_t = self._check_class(c, y.shape[0], y.device)
        with self._input_grad(y) as (y_in, create_graph):
            logits = self.forward_head(self.forward_features(y_in))
            lp = F.log_softmax(logits.to(_real_dtype(logits)), dim=-1).gather(1, c_t[:, None])[:, 0]
            (g,) = torch.autograd.grad(lp.sum(), y_in, create_graph=create_graph)
            return g

    # -- helpers --------------------------------------------------------------------------------

    def _check_class(self, c: ClassLike, batch_size: int, device) -> torch.Tensor:
        num_classes = getattr(self, 'num_classes', 0)
        if not num_classes:
            raise ValueError('class-conditional methods need a classifier head (num_classes > 0)')
        if isinstance(c, bool) or not isinstance(c, (numbers.Integral, torch.Tensor)):
            raise TypeError(f'c must be an int or a LongTensor [B], got {type(c).__name__}')
        if isinstance(c, torch.Tensor):
            if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
                raise TypeError(f'c must be an integer tensor (class indices) [B], got dtype {c.dtype}')
            if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != batch_size):
                raise ValueError(f'c must be an int or a tensor of shape [B]=[{batch_size}], got shape {list(c.shape)}')
            c_t = c.to(device=device, dtype=torch.long).expand(batch_size)
        else:
            c_t = torch.full((batch_size,), int(c), device=device, dtype=torch.long)
        if bool((c_t < 0).any()) or bool((c_t >= num_classes).any()):
            raise ValueError(f'class index out of range: expected 0 <= c < {num_classes}, got {c}')
        return c_t

    def _input_grad(self, y: torch.Tensor):
        return _InputGrad(self, y)


class _InputGrad:
    """Context: grad enabled, y as a leaf requiring grad (or y itself when it already requires grad).

    Yields (y_in, create_graph). A graph of the gradient is built only when the model is training
    (the loss differentiates through it) or y requires grad (an attack or a solver does).
    """

    def __init__(self, module: nn.Module, y: torch.Tensor):
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                'denoising takes an input gradient, which torch.inference_mode() forbids: '
                'use torch.no_grad() instead (grad is re-enabled inside)')
        self.module, self.y = module, y
        self._grad_ctx = torch.enable_grad()

    def __enter__(self):
        self._grad_ctx.__enter__()
        y = self.y
        create_graph = bool(self.module.training or y.requires_grad)
        y_in = y if y.requires_grad else y.detach().requires_grad_(True)
        return y_in, create_graph

    def __exit__(self, *exc):
        return self._grad_ctx.__exit__(*exc)


def _wrapped_in_chans(model: nn.Module, cfg: Dict[str, Any], default: int) -> int:
    # The first conv's weight is the truth: timm keeps the 3-channel cfg when in_chans is overridden.
    first_conv = cfg.get('first_conv')
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0] if first_conv else None
    if first_conv:
        try:
            weight = model.get_submodule(first_conv).weight
            if weight.ndim >= 2:
                return int(weight.shape[1])
        except AttributeError:
            pass
    return int(cfg.get('input_size', (default, 0, 0))[0])


class PixelInput(nn.Module):
    """A timm classifier fed [0, 1] pixels: its configured mean/std are applied inside.

    Every model here takes raw [0, 1] pixels (the noise is added to them), while timm's classifiers
    expect their data pipeline to normalise; this module does it for them. Its ``pretrained_cfg``
    reports mean 0 and std 1, so that timm's pipeline does not normalise twice.

    Args:
        model: A timm classifier.
        persistent: Keep mean and std in the state dict (``JointDensityWrapper``'s exports hold them);
            False leaves the state dict the classifier's own, under ``model.``.
    """

    def __init__(self, model: nn.Module, persistent: bool = True):
        super().__init__()
        self.model = model
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        mean = cfg.get('mean', (0., 0., 0.))
        std = cfg.get('std', (1., 1., 1.))
        self.in_chans = _wrapped_in_chans(model, cfg, len(mean))
        if len(mean) != self.in_chans:
            # e.g. create_model(..., in_chans=1) keeps the 3-channel cfg: use the mean of its stats.
            mean = (sum(mean) / len(mean),) * self.in_chans
            std = (sum(std) / len(std),) * self.in_chans
        p = next(model.parameters())
        for name, value in (('mean', mean), ('std', std)):
            self.register_buffer(name, torch.tensor(value, dtype=p.dtype, device=p.device).view(1, -1, 1, 1),
                                 persistent=persistent)
        self.pretrained_cfg = copy.deepcopy(cfg)
        self.pretrained_cfg.update(mean=(0.,) * self.in_chans, std=(1.,) * self.in_chans)
        self.default_cfg = self.pretrained_cfg

    @classmethod
    def if_needed(cls, model: nn.Module) -> nn.Module:
        """``model`` itself when its config's mean is 0 and std 1 (it takes raw pixels), else a
        ``PixelInput`` around it whose state dict is the model's."""
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        mean, std = tuple(cfg.get('mean', (0., 0., 0.))), tuple(cfg.get('std', (1., 1., 1.)))
        if all(m == 0 for m in mean) and all(s == 1 for s in std):
            return model
        return cls(model, persistent=False)

    @property
    def num_classes(self) -> int:
        return getattr(self.model, 'num_classes', 0)

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels [B, C, H, W] -> the wrapped model's input."""
        return (y - self.mean) / self.std

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(y))


class JointDensityWrapper(JointDensityMixin, PixelInput):
    """Joint-density methods around any timm classifier.

    Takes [0, 1] pixels and applies the wrapped model's mean/std inside (``PixelInput``); its
    ``pretrained_cfg`` reports mean (0, 0, 0) and std (1, 1, 1) so that timm's data pipeline does not
    normalise twice. The energy head is one quadratic map on the final feature map; it starts untrained.

    Args:
        model: A timm classifier (``forward_features`` / ``forward_head``).
        energy_init_scale: Initial scale of the energy head (see ``EnergyHead``).
        warn_untrained: Warn that the energy head is untrained (set False when loading weights).
        energy_init: Init of the energy head, 'normal' by default: many timm models end with a
            per-position LayerNorm, for which an orthogonal init gives a constant energy (see
            ``EnergyHead``).
        unfuse_attention: Switch timm attention blocks (``fused_attn``) to the explicit path, whose
            double backward exists (the fused kernels have none); the outputs are the same.

    Example:
        >>> import timm, torch, timm_joint
        >>> net = timm_joint.JointDensityWrapper(
        ...     timm.create_model('resnet18', num_classes=10), warn_untrained=False)
        >>> net.denoise(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
            self,
            model: nn.Module,
            energy_init_scale: float = 0.1,
            warn_untrained: bool = True,
            unfuse_attention: bool = True,
            energy_init: str = 'normal',
    ):
        if not (hasattr(model, 'forward_features') and hasattr(model, 'forward_head')):
            raise TypeError('JointDensityWrapper needs a timm classifier with forward_features and forward_head')
        super().__init__(model, persistent=True)
        if unfuse_attention:
            # Fused attention (F.scaled_dot_product_attention) has no double backward, which the
            # denoising loss and attacks through D need ('derivative for
            # aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented'):
            # switch timm's attention blocks to their explicit softmax(q k^T) v path.
            for m in model.modules():
                if isinstance(getattr(m, 'fused_attn', None), bool):
                    m.fused_attn = False
        p = next(model.parameters())
        self.energy_head = EnergyHead([model.num_features], init_scale=energy_init_scale, init=energy_init,
                                      device=p.device, dtype=p.dtype)
        if warn_untrained:
            warnings.warn(
                'JointDensityWrapper: the energy head starts untrained, so denoise/log_prob/score are '
                'meaningless until it is trained (train_joint.py); the classifier logits are unchanged.',
                stacklevel=2)

    @property
    def num_features(self) -> int:
        return self.model.num_features

    def forward_features(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.normalize(y))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def energy_maps(self, y: torch.Tensor) -> List[torch.Tensor]:
        return self.energy_head([self._as_map(self.forward_features(y))])

    def joint_features(self, y: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        x = self.forward_features(y)
        return x, self.energy_head([self._as_map(x)])

    def _as_map(self, x: torch.Tensor) -> torch.Tensor:
        # The energy head works on [B, C, H, W] maps. Token models give [B, N, C] (all tokens,
        # prefix tokens included, enter the sum); some timm models (Swin) give NHWC maps.
        if x.ndim == 3:
            return x.transpose(1, 2).unsqueeze(-1)
        if x.ndim == 4 and getattr(self.model, 'output_fmt', 'NCHW') == 'NHWC':
            return x.permute(0, 3, 1, 2)
        return x

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(y))
