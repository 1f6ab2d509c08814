"""Models registered with timm on import."""
from .gradresnet import *  # noqa: F401,F403  (registers the entry points)
from .gradresnet import GradResNet, HF_HUB_ORG
