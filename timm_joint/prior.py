"""timm_joint models as deepinv denoisers and priors: the learned prior at work.

A joint model of log p_sigma(y, c) carries two priors of natural images: an implicit one, its denoiser
D(y) = y - grad E(y) (a blind MMSE denoiser, by Tweedie-Miyasawa), and an explicit one, its energy E(y)
(log p_sigma(y) = -E(y) / sigma^2 + const, DESIGN §1). ``DeepinvAdapter`` turns any model here into a
``deepinv.models.Denoiser`` so that deepinv's plug-and-play priors (``PnP``, ``RED``, ``ScorePrior``),
its optimisation algorithms (HQS/DPIR, PGD, ...) and its diffusion samplers can use it; it also exposes
the explicit potential for solvers that use one (``GradientStepPrior``).

Because D(y) = y - grad E(y) is the gradient step of an explicit potential, GradResNet is a
gradient-step denoiser in the sense of Hurault et al. (2022): plug-and-play with it minimises an explicit
objective f(x) + lambda * E(x), which deepinv can evaluate (and backtrack on) through
``GradientStepPrior``.

What sigma means here:

* blind models (GradResNet, ``JointDensityWrapper`` models, the DnCNN baseline) ignore the sigma a solver
  passes: the network estimates the noise level of its input itself. Inside a plug-and-play iteration
  the denoiser then removes what it perceives as noise in the current iterate, whatever the schedule
  says; the schedule still sets the data-fidelity step of the algorithm (how strongly each iterate is
  pulled back to the measurement).
* non-blind models (the DRUNet baseline) receive sigma, as deepinv's own denoisers do.
* the class-conditional denoiser D(y, c) = D(y) + sigma^2 grad log p(c | y) needs sigma: it weights
  the classifier's gradient (sigma in pixel units of [0, 1] images).

deepinv (>= 0.5) is an optional dependency (``pip install -e ".[prior]"``); importing this module without
it raises an ImportError that says so.
"""
import numbers
from typing import Any, Optional, Union

import torch
import torch.nn as nn

try:
    from deepinv.models import Denoiser
    from deepinv.optim import RED
except ImportError as e:  # pragma: no cover - exercised only without the optional extra
    raise ImportError(
        'timm_joint.prior needs deepinv (an optional dependency): pip install -e ".[prior]" '
        '(or pip install "deepinv>=0.5")') from e

from .protocol import has_energy, is_blind, is_denoiser, is_joint

__all__ = ['DeepinvAdapter', 'GradientStepPrior']

SigmaLike = Union[float, int, torch.Tensor, None]
LabelLike = Union[int, torch.Tensor, None]


def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


class DeepinvAdapter(Denoiser):
    """A timm_joint model as a ``deepinv.models.Denoiser``: ``forward(x, sigma, **kwargs)``.

    Works for GradResNet, ``JointDensityWrapper`` models and the DnCNN/DRUNet baselines
    (``dncnn_deepinv``, ``drunet_deepinv``): any module with ``denoise(y, *, sigma=None, c=None)``.

    * Blind models ignore sigma (it is still validated when given); non-blind ones (DRUNet) need it.
    * Class-conditional when labels are given: at construction (``c=``, the default for every call), or
      per call through ``c=`` or deepinv's ``class_labels=`` keyword (which its diffusion samplers pass;
      one-hot or probability rows [B, num_classes] are read by their argmax). Then
      D(x, c) = D(x) + guidance * sigma^2 * grad log p(c | x), which needs sigma.
    * Works under ``torch.no_grad()`` (deepinv's optimisers, DiffPIR and the SDE solvers call the
      denoiser that way): the joint models enable grad inside to take their input gradient. When x
      requires grad (DPS, unfolded training), the output carries the graph, so solvers can differentiate
      through the denoiser (double backward).
    * Other keyword arguments that deepinv's wrappers pass along (e.g. ``input_in_minus_one_one``) are
      ignored.

    The explicit potential (joint models only): ``potential(x, sigma)`` is g with D(x) = x - grad g(x),
    that is E(x) (blind) or sigma^2 * (-log p_sigma(x, c)) (conditional, up to a constant);
    ``neg_log_prob(x, sigma)`` is the unnormalised -log p_sigma(x[, c]) itself.

    Args:
        model: A timm_joint model with ``denoise`` (put it in eval mode for inference: in training mode
            the joint models build the graph of the input gradient).
        c: Default class for conditional denoising: an int or a LongTensor [B]; None for the blind D.
        guidance: Weight w of the class term, D(x) + w * (D(x, c) - D(x)); 1 is Bayes' rule
            (the model's own D(x, c)), larger values sharpen the class, 0 is the blind D.

    Example:
        >>> import timm, torch, timm_joint
        >>> from timm_joint.prior import DeepinvAdapter
        >>> model = timm.create_model('gradresnet_tiny_joint', num_classes=10).eval()
        >>> denoiser = DeepinvAdapter(model)
        >>> y = torch.rand(2, 3, 32, 32)
        >>> with torch.no_grad():
        ...     x_hat = denoiser(y, 25 / 255)        # blind: sigma is ignored
        >>> torch.allclose(x_hat, model.denoise(y), atol=1e-6)
        True
        >>> denoiser(y, 25 / 255, class_labels=torch.tensor([3, 7])).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, model: nn.Module, *, c: LabelLike = None, guidance: float = 1.0):
        super().__init__()
        if isinstance(model, DeepinvAdapter):
            model = model.model
        if not isinstance(model, nn.Module) or not is_denoiser(model):
            raise TypeError(
                'DeepinvAdapter expects a timm_joint model with denoise(y, *, sigma=None, c=None) (a GradResNet, '
                'a JointDensityWrapper, or the dncnn_deepinv / drunet_deepinv baselines), got '
                f'{type(model).__name__}; wrap a plain timm classifier with timm_joint.JointDensityWrapper '
                'and train its energy head first')
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not guidance >= 0:
            raise ValueError(f'guidance must be a number >= 0, got {guidance!r}')
        self.model = model
        self.blind = is_blind(model)
        self.guidance = float(guidance)
        self.c = None
        if c is not None:
            self._check_conditional()
            self.c = c

    # -- deepinv's Denoiser interface ----------------------------------------------------------------

    def forward(
            self,
            x: torch.Tensor,
            sigma: SigmaLike = None,
            *,
            class_labels: LabelLike = None,
            c: LabelLike = None,
            **kwargs: Any,
    ) -> torch.Tensor:
        """Denoise x: D(x), or D(x, c) when a class is given.

        Args:
            x: Noisy images [B, C, H, W], pixels in [0, 1].
            sigma: Noise level in pixel units of [0, 1] images: a float, a tensor [], [B] or [B, 1, 1, 1].
                Ignored by blind models (validated when given); required by non-blind ones and by D(x, c).
            class_labels: Classes, deepinv's keyword: an int, a LongTensor [B], or one-hot rows [B, K].
            c: Classes, this package's keyword (takes precedence over ``class_labels``).
            **kwargs: Other keywords from deepinv's wrappers, ignored.

        Returns:
            Denoised images [B, C, H, W], in x's dtype (not clamped).
        """
        labels = self._labels(c if c is not None else class_labels if class_labels is not None else self.c, x)
        if labels is not None:
            sigma_t = self._sigma(sigma, x, required='class-conditional denoising')
            return self._conditional(x, sigma_t, labels)
        if self.blind:
            if sigma is not None:
                self._sigma(sigma, x, required=None)
            return self._call(x, None, None)
        sigma_t = self._sigma(sigma, x, required=f'the non-blind {type(self.model).__name__}')
        return self._call(x, sigma_t, None)

    # -- the explicit potential ----------------------------------------------------------------------

    def potential(
            self,
            x: torch.Tensor,
            sigma: SigmaLike = None,
            *,
            class_labels: LabelLike = None,
            c: LabelLike = None,
            **kwargs: Any,
    ) -> torch.Tensor:
        """The potential g of the denoiser, D(x) = x - grad g(x), [B].

        Blind: g = E(x) (sigma ignored). Conditional: g = sigma^2 * (-log p_sigma(x, c)) + const
        = E(x) - sigma^2 log p(c | x) (with guidance w: E(x) - w sigma^2 log p(c | x)).

        Raises:
            TypeError: the model has no explicit potential (the DnCNN/DRUNet baselines).
        """
        self._check_potential()
        labels = self._labels(c if c is not None else class_labels if class_labels is not None else self.c, x)
        x_in = self._cast_in(x)
        if labels is None:
            return self.model.energy(x_in).to(x.dtype)
        sigma_t = self._sigma(sigma, x, required='the class-conditional potential')
        s2 = sigma_t.to(x_in.dtype).pow(2)
        if self.guidance == 1.0:
            g = -s2 * self.model.log_prob(x_in, sigma=sigma_t.to(x_in.dtype), c=labels)
        else:
            # log p(c | x) = log p_sigma(x, c) - log p_sigma(x): the energies cancel.
            log_p_c = (self.model.log_prob(x_in, sigma=sigma_t.to(x_in.dtype), c=labels)
                       - self.model.log_prob(x_in, sigma=sigma_t.to(x_in.dtype)))
            g = self.model.energy(x_in) - self.guidance * s2 * log_p_c
        return g.to(x.dtype)

    def neg_log_prob(
            self,
            x: torch.Tensor,
            sigma: SigmaLike,
            *,
            class_labels: LabelLike = None,
            c: LabelLike = None,
            **kwargs: Any,
    ) -> torch.Tensor:
        """-log p_sigma(x) or -log p_sigma(x, c), unnormalised (DESIGN §1: comparable between images at one
        sigma, never a likelihood), [B]."""
        self._check_potential()
        labels = self._labels(c if c is not None else class_labels if class_labels is not None else self.c, x)
        sigma_t = self._sigma(sigma, x, required='log p_sigma')
        x_in = self._cast_in(x)
        return -self.model.log_prob(x_in, sigma=sigma_t.to(x_in.dtype), c=labels).to(x.dtype)

    def potential_grad(self, x: torch.Tensor, sigma: SigmaLike = None, **kwargs: Any) -> torch.Tensor:
        """grad g(x) = x - D(x), [B, C, H, W] (for any model: the residual of its denoiser)."""
        return x - self.forward(x, sigma, **kwargs)

    # -- helpers -------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, 'num_classes', 0) or 0) if is_joint(self.model) else 0

    def _check_potential(self) -> None:
        if not has_energy(self.model):
            raise TypeError(
                f'{type(self.model).__name__} has no explicit potential (only the joint models have an energy E '
                f'with D = y - grad E): use it through deepinv.optim.PnP or RED instead of GradientStepPrior')

    def _check_conditional(self) -> None:
        if not is_joint(self.model):
            raise ValueError(
                f'{type(self.model).__name__} has no classifier (num_classes == 0): class-conditional '
                f'denoising needs a joint model; drop the class labels for the blind denoiser')

    def _labels(self, labels: LabelLike, x: torch.Tensor) -> Optional[torch.Tensor]:
        if labels is None:
            return None
        self._check_conditional()
        if isinstance(labels, torch.Tensor) and labels.ndim == 2 and labels.is_floating_point():
            if labels.shape[1] != self.num_classes:
                raise ValueError(
                    f'one-hot class labels must be [B, {self.num_classes}], got {list(labels.shape)}')
            labels = labels.argmax(1)
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise TypeError(f'class labels must be integers (or one-hot rows [B, K]), got dtype {labels.dtype}')
            if labels.ndim == 1 and labels.shape[0] == 1 and x.shape[0] > 1:
                labels = labels.expand(x.shape[0])
            labels = labels.to(x.device)
        return labels  # range and shape are checked by the model (a ValueError naming what it expects)

    def _sigma(self, sigma: SigmaLike, x: torch.Tensor, *, required: Optional[str]) -> Optional[torch.Tensor]:
        """sigma as a tensor [B] (deepinv passes floats, 0-d tensors, [B] or [B, 1, 1, 1])."""
        if sigma is None:
            if required:
                raise ValueError(f'{required} needs the noise level: call the denoiser as denoiser(x, sigma) '
                                 f'(sigma in pixel units of [0, 1] images, e.g. 25/255)')
            return None
        if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, torch.Tensor)):
            raise TypeError(f'sigma must be a float or a tensor [B] (pixel units of [0, 1] images), '
                            f'got {type(sigma).__name__}')
        b = x.shape[0]
        if isinstance(sigma, torch.Tensor):
            s = sigma.detach()
            if s.is_complex() or s.dtype == torch.bool:
                raise TypeError(f'sigma must be a real tensor, got dtype {s.dtype}')
            if s.numel() == 1:
                s = s.reshape(()).expand(b)
            elif s.shape[0] == b and s[0].numel() == 1:
                s = s.reshape(b)
            else:
                raise ValueError(f'sigma must be a float or a tensor of shape [], [B] or [B, 1, 1, 1] with '
                                 f'B={b}, got shape {list(sigma.shape)}')
            s = s.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        else:
            s = torch.full((b,), float(sigma), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or (required and bool((s <= 0).any())):
            raise ValueError(f'sigma must be finite and {"> 0" if required else ">= 0"} (pixel units of [0, 1] '
                             f'images), got {sigma}')
        return s

    def _cast_in(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _model_dtype(self.model)
        return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != dtype else x

    def _call(self, x: torch.Tensor, sigma: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> torch.Tensor:
        x_in = self._cast_in(x)
        kw = {}
        if sigma is not None:
            kw['sigma'] = sigma.to(x_in.dtype)
        if labels is not None:
            kw['c'] = labels
        return self.model.denoise(x_in, **kw).to(x.dtype)

    def _conditional(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1.0:
            return self._call(x, sigma, labels)
        # D(x) + w (D(x, c) - D(x)) = D(x) + w sigma^2 grad log p(c | x): eq. 9 of the paper.
        x_in = self._cast_in(x)
        g = self.model.adversarial_gradient(x_in, c=labels)
        s2 = sigma.to(g.dtype).pow(2).view(-1, *([1] * (x.ndim - 1)))
        return (self.model.denoise(x_in) + self.guidance * s2 * g).to(x.dtype)

    def extra_repr(self) -> str:
        return f'blind={self.blind}, potential={has_energy(self.model)}, guidance={self.guidance:g}'


class GradientStepPrior(RED):
    """An explicit plug-and-play prior from a gradient-step denoiser: g = the model's potential.

    RED's gradient, grad g(x) = x - D(x), is here the gradient of an explicit function g (E(x) for the
    blind joint models, Hurault et al.'s gradient-step denoiser), so deepinv's optimisers can evaluate
    the objective f(x) + lambda * g(x) (``explicit_prior`` is True: the cost is tracked, and backtracking
    on the step size is possible). For models without a potential use ``deepinv.optim.RED`` or ``PnP``.

    Args:
        denoiser: A ``DeepinvAdapter`` (or a model, which is wrapped) of a joint model.

    Example:
        >>> import timm, torch, timm_joint
        >>> from timm_joint.prior import GradientStepPrior
        >>> prior = GradientStepPrior(timm.create_model('gradresnet_tiny_joint').eval())
        >>> prior(torch.rand(2, 3, 32, 32), 0.1).shape      # g(x) = E(x), [B]
        torch.Size([2])
    """

    def __init__(self, denoiser: Union[DeepinvAdapter, nn.Module]):
        adapter = denoiser if isinstance(denoiser, DeepinvAdapter) else DeepinvAdapter(denoiser)
        adapter._check_potential()
        super().__init__(denoiser=adapter)
        self.explicit_prior = True

    def fn(self, x: torch.Tensor, sigma_denoiser: SigmaLike = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """g(x), [B] (deepinv's cost function calls it with ``reduce=False``, which is ignored)."""
        kwargs.pop('reduce', None)
        return self.denoiser.potential(x, sigma_denoiser, **kwargs)

    def grad(self, x: torch.Tensor, sigma_denoiser: SigmaLike = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """grad g(x) = x - D(x), [B, C, H, W]."""
        return x - self.denoiser(x, sigma_denoiser, **kwargs)
