"""timm-joint: classification-denoising networks for timm.

Importing this package registers the GradResNet models with timm's registry::

    import timm, timm_joint
    model = timm.create_model('gradresnet18_joint')
"""
from .joint import EnergyHead, JointDensityMixin, JointDensityWrapper
from .models import HF_HUB_ORG, GradResNet
from .noise import from_255, to_255

__version__ = '0.1.0'

__all__ = ['GradResNet', 'JointDensityMixin', 'JointDensityWrapper', 'EnergyHead', 'HF_HUB_ORG',
           'from_255', 'to_255', 'hub']


def __getattr__(name: str):
    # timm_joint.hub (save_pretrained / load_export / publish) is imported when first used, not here:
    # importing it with the package made `python -m timm_joint.hub` warn that runpy found it loaded.
    if name == 'hub':
        import importlib
        return importlib.import_module('.hub', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
