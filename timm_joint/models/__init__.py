"""Models registered with timm on import (``python -m timm_joint.models`` prints the model table)."""
from .denoisers import DeepinvDenoiser  # noqa: F401  (registers dncnn_deepinv, drunet_deepinv)
from .gradresnet import *  # noqa: F401,F403  (registers the entry points)
from .gradresnet import GradResNet, HF_HUB_ORG

__all__ = ['GradResNet', 'HF_HUB_ORG']
