"""timm-joint: classification-denoising networks for timm.

Importing this package registers the GradResNet models with timm's registry::

    import timm, timm_joint
    model = timm.create_model('gradresnet18_joint')
"""
from .joint import EnergyHead, JointDensityMixin, JointDensityWrapper
from .models import HF_HUB_ORG, GradResNet
from .noise import from_255, to_255
from . import hub  # noqa: E402  (timm_joint.hub.save_pretrained / load_export / publish)

__version__ = '0.1.0'

__all__ = ['GradResNet', 'JointDensityMixin', 'JointDensityWrapper', 'EnergyHead', 'HF_HUB_ORG',
           'from_255', 'to_255', 'hub']
