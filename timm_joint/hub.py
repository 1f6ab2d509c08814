"""Save, load and publish models in timm's Hugging Face Hub layout.

A model folder holds ``model.safetensors`` and ``config.json`` in timm's format (architecture,
num_classes, num_features, pretrained_cfg, model_args), so ``timm.create_model('local-dir:PATH')``
and ``timm.create_model('hf-hub:ORG/NAME')`` rebuild it exactly (after ``import timm_joint``).
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

__all__ = ['save_pretrained', 'atomic_replace_dir']


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def atomic_replace_dir(tmp_dir: Union[str, Path], final_dir: Union[str, Path]) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing it without ever losing both.

    The old folder is first renamed aside, then the new one renamed in, then the old one removed:
    a kill at any point leaves either the old or the new folder whole (at worst under ``.old``).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + '.old')
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def save_pretrained(
        model: nn.Module,
        path: Union[str, Path],
        *,
        model_name: str,
        model_args: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` and timm's ``config.json`` to ``path``, atomically.

    Args:
        model: The model (unwrapped: no DDP, no compile).
        path: Output folder; replaced as a whole once the new one is complete.
        model_name: The timm architecture name the folder rebuilds with.
        model_args: Constructor arguments beyond the entry point's defaults (e.g. num_classes).
        pretrained_cfg: The pretrained config to store (defaults to the model's own).
        extra_config: Further top-level keys for config.json.

    Returns:
        The folder path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = dict(pretrained_cfg if pretrained_cfg is not None else getattr(model, 'pretrained_cfg', {}) or {})
    for key in ('architecture', 'hf_hub_id', 'file', 'source', 'url', 'state_dict'):
        cfg.pop(key, None)
    num_classes = getattr(model, 'num_classes', cfg.get('num_classes'))
    cfg['num_classes'] = num_classes
    config = {
        'architecture': model_name,
        'num_classes': num_classes,
        'num_features': getattr(model, 'num_features', None),
        'pretrained_cfg': _jsonable(cfg),
        'model_args': _jsonable(model_args or {}),
    }
    config.update(_jsonable(extra_config or {}))
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.tmp-', dir=path.parent))
    try:
        save_file(tensors, str(tmp / 'model.safetensors'), metadata={'format': 'pt'})
        with open(tmp / 'config.json', 'w') as f:
            json.dump(config, f, indent=2)
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
