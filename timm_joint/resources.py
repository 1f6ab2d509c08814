"""Data folders shipped with the package: the model-card templates (``hub_cards/``) and the recipes
(``configs/``).

Both live at the top of the source tree, where users know them. A wheel carries them inside the package
(pyproject.toml maps ``hub_cards/`` to ``timm_joint/hub_cards/`` and ``configs/`` to
``timm_joint/configs/``); an editable install or a source checkout reads them at the repository root.
"""
import os
from pathlib import Path
from typing import List, Optional, Union

__all__ = ['resource_dir', 'packaged_configs', 'find_config']

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder ``name`` (``'hub_cards'`` or ``'configs'``) of this installation.

    Looks inside the package first (a wheel install), then beside it (the repository root of an editable
    install). If neither exists, returns the wheel location, so that an error names where it should be.
    """
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    return _PACKAGE_DIR / name


def packaged_configs() -> List[str]:
    """File names of the recipes in ``configs/`` (e.g. ``quickstart.yaml``), sorted."""
    folder = resource_dir('configs')
    return sorted(p.name for p in folder.glob('*.yaml')) if folder.is_dir() else []


def find_config(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The config file ``path``, or the packaged recipe of that name (``configs/NAME.yaml`` or ``NAME.yaml``).

    A file that exists always wins; the packaged recipes let an installed package run the README's
    commands (``-c configs/quickstart.yaml``) from any folder. None if neither exists.
    """
    if os.path.isfile(path):
        return Path(path)
    p = Path(path)
    if not p.is_absolute() and p.parent in (Path('.'), Path('configs')):
        packaged = resource_dir('configs') / p.name
        if packaged.is_file():
            return packaged
    return None
