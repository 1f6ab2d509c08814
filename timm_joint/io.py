"""Weights in and out, atomic writes, and the one model loader.

Results, exports, figures, data folders and checkpoints are written through ``atomic_file`` /
``atomic_write`` (one file) or ``atomic_dir`` / ``atomic_replace_dir`` (a folder): a reader, or a run
killed half-way, sees the old version or the new one, never a mix.

Weights are read by ``read_state_dict`` alone: safetensors files, or PyTorch checkpoints read with
``torch.load(weights_only=True)``, whose unpickler builds tensors and plain containers only, so a
pickle that would import and call code is refused before it runs. A file is recognised by its
content, not its name: a text file named ``x.safetensors`` gets one clear ValueError.

``load_model`` turns a model name and a checkpoint (an export folder, ``local-dir:``, ``hf-hub:``, a
state-dict file, or nothing: the registry's pretrained weights) into a model that takes [0, 1]
pixels, with the record of where it came from. The evaluation, the restoration and sampling commands
and the Hub helpers load through it.
"""
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    'SAFE_WEIGHTS', 'TORCH_WEIGHTS', 'WEIGHT_FILES', 'REPO_ID',
    'atomic_file', 'atomic_write', 'atomic_dir', 'atomic_replace_dir',
    'weights_format', 'find_weights', 'read_state_dict', 'write_state_dict', 'check_fits',
    'read_config', 'train_args_files', 'create_from_config', 'load_model', 'is_download_error',
    'PretrainedUnavailableError', 'check_hub_weights',
]

PathLike = Union[str, os.PathLike]

# Weight files an export folder may hold, in the order they are looked for: the safe format first,
# then the names timm and open_clip give PyTorch checkpoints (read with weights_only=True).
SAFE_WEIGHTS = 'model.safetensors'
TORCH_WEIGHTS = ('pytorch_model.bin', 'pytorch_model.pth', 'model.pth', 'open_clip_pytorch_model.bin')
WEIGHT_FILES = (SAFE_WEIGHTS,) + TORCH_WEIGHTS

# A Hugging Face Hub repository id, ORG/NAME.
REPO_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$')

# Modules whose exceptions mean "the weights could not be fetched": huggingface_hub and its HTTP clients
# (huggingface_hub 2 vendors httpx as httpx2).
_DOWNLOAD_MODULES = ('huggingface_hub', 'requests', 'httpx', 'urllib3', 'httpcore', 'httpx2', 'httpcore2')


# -- atomic writes -----------------------------------------------------------------------------------

def _temporary_name(path: Path) -> Path:
    # Beside the target, since os.replace is atomic only within one file system; hidden, and unique per
    # writer, so that two processes writing the same file never share a temporary.
    return path.with_name(f'.{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')


@contextmanager
def atomic_file(path: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path to write ``path`` through: when the block ends without error, it replaces
    ``path`` in one rename; otherwise it is removed and ``path`` is left as it was.

    Args:
        path: The file to write (its folder is created).
        overwrite: Replace an existing ``path``. When False, a ``path`` that appeared while the
            block ran is kept and FileExistsError raised.

    Example:
        >>> with atomic_file('out/figure.png') as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp, format='png')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        if not overwrite and path.exists():
            raise FileExistsError(f'{path} appeared while it was being written: refusing to overwrite it '
                                  f'(pass --overwrite)')
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: PathLike, data: Union[str, bytes], *, overwrite: bool = True) -> Path:
    """Write text or bytes to ``path`` atomically (``atomic_file``).

    Returns:
        The path written.
    """
    with atomic_file(path, overwrite=overwrite) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def atomic_replace_dir(tmp_dir: PathLike, final_dir: PathLike) -> None:
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


@contextmanager
def atomic_dir(final_dir: PathLike) -> Iterator[Path]:
    """An empty temporary folder to fill: when the block ends without error it replaces ``final_dir``
    as a whole (``atomic_replace_dir``); otherwise it is removed and ``final_dir`` is left as it was.

    Example:
        >>> with atomic_dir('runs/a/export/best') as tmp:  # doctest: +SKIP
        ...     (tmp / 'config.json').write_text('{}')
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not final_dir.is_dir():  # never replace a file with a folder
        raise ValueError(f'{str(final_dir)!r} is a file: expected a folder to write into')
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final_dir.name}.tmp-', dir=final_dir.parent))
    try:
        yield tmp
        atomic_replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- weights -----------------------------------------------------------------------------------------

def weights_format(path: PathLike) -> Optional[str]:
    """The format of a weights file, from its first bytes: 'safetensors', 'torch' (a zip written by
    ``torch.save``, or a legacy pickle), or None (neither)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON.
    if len(head) == 9 and head[8:9] == b'{' and 2 <= int.from_bytes(head[:8], 'little') <= size - 8:
        return 'safetensors'
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
        return 'torch'
    return None


def find_weights(folder: PathLike, *, torch_files: bool = True) -> Path:
    """The weights file of an export folder: ``model.safetensors``, else (``torch_files``) the first of
    ``TORCH_WEIGHTS``.

    Raises:
        ValueError: the folder holds none of them.
    """
    folder = Path(folder)
    names = WEIGHT_FILES if torch_files else (SAFE_WEIGHTS,)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f'no weights in {folder}: expected {SAFE_WEIGHTS} (written by save_pretrained)'
                     + (f' or one of {", ".join(TORCH_WEIGHTS)}' if torch_files else ''))


def read_state_dict(path: PathLike, *, torch_files: bool = True) -> Dict[str, torch.Tensor]:
    """Read a state dict of tensors from a weights file or an export folder, never running code.

    A safetensors file is read as such whatever its name; a PyTorch checkpoint (``torch_files``) with
    ``torch.load(weights_only=True)``, unwrapping a training checkpoint's ``state_dict`` / ``model`` /
    ``state_dict_ema`` and DDP's ``module.`` prefix.

    Args:
        path: A file, or a folder (``find_weights``).
        torch_files: Also read PyTorch checkpoints; False accepts safetensors only.

    Returns:
        {name: tensor} on the CPU.

    Raises:
        ValueError: a missing path, a file that is not weights (or not safetensors, when only those
            are accepted), a pickle that is not plain tensors, or a checkpoint that is not a state dict.
    """
    path = Path(path)
    if path.is_dir():
        path = find_weights(path, torch_files=torch_files)
    if not path.is_file():
        raise ValueError(f'checkpoint {str(path)!r} does not exist')
    kind = weights_format(path)
    # The content decides, never the name: a text file named x.safetensors is no weights file.
    if kind is None:
        raise ValueError(f'checkpoint {str(path)!r} is not a weights file (its first bytes are neither a '
                         f'safetensors header nor a torch.save archive): expected a safetensors file'
                         + (' or a PyTorch checkpoint' if torch_files else ''))
    if kind == 'torch' and not torch_files:
        raise ValueError(f'checkpoint {str(path)!r} is a PyTorch checkpoint: expected a safetensors file '
                         f'(pickled checkpoints are refused here)')
    if kind == 'safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except (SafetensorError, OSError) as e:
            raise ValueError(f'checkpoint {str(path)!r} is not a readable safetensors file: {e}') from None
    try:
        with open(path, 'rb') as f:  # a file object: torch.load would go by a .safetensors name, not the content
            sd = torch.load(f, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a file it cannot read)
        first_line = (str(e).strip().splitlines() or [''])[0]
        if isinstance(e, pickle.UnpicklingError) or 'weights_only' in str(e):
            raise ValueError(
                f'refused to load {path}: it is not a plain tensor checkpoint (torch.load with weights_only=True '
                f'rejected it: {type(e).__name__}). Only safetensors files or pickles of tensors are read; '
                f're-export trusted weights with save_pretrained.') from None
        raise ValueError(f'could not read checkpoint {str(path)!r} as a PyTorch checkpoint: '
                         f'{type(e).__name__}: {first_line}') from None
    for key in ('state_dict', 'model', 'state_dict_ema'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f'checkpoint {str(path)!r} is not a state dict of named tensors')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}


def write_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write tensors as a safetensors file (timm's ``format: pt`` metadata), atomically.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={'format': 'pt'})
    return Path(path)


def check_fits(
        expected: Mapping[str, torch.Tensor],
        state_dict: Mapping[str, torch.Tensor],
        *,
        source: str,
        target: str,
        hint: str = '',
) -> None:
    """Refuse a state dict that does not fit a model's, listing what differs.

    Args:
        expected: The model's state dict (a meta-device model's does: only names and shapes count).
        state_dict: The tensors read.
        source: What they were read from, as the message names it.
        target: The model, as the message names it.
        hint: A sentence to end the message with.

    Raises:
        ValueError: '{source} does not fit {target}: missing keys: ...; unexpected keys: ...; shape
            mismatches: ...' (five of each, and how many more).
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}'
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
        if items:
            more = f' (+{len(items) - 5} more)' if len(items) > 5 else ''
            parts.append(f'{label}: {", ".join(items[:5])}{more}')
    if parts:
        raise ValueError(f'{source} does not fit {target}: ' + '; '.join(parts) + hint)


# -- export folders ----------------------------------------------------------------------------------

def train_args_files(folder: PathLike) -> List[Path]:
    """Where the training arguments of the export in ``folder`` can be: its own args.yaml, and the run's
    (train_joint.py writes runs/NAME/args.yaml beside runs/NAME/export/{last,best,...}). Only where a run
    puts it, so that an unrelated args.yaml higher up is never taken for this model's."""
    folder = Path(folder)
    candidates = [folder / 'args.yaml']
    if folder.name == 'export':
        candidates.append(folder.parent / 'args.yaml')
    if folder.parent.name == 'export':
        candidates.append(folder.parent.parent / 'args.yaml')
    return candidates


def read_config(folder: PathLike) -> Dict[str, Any]:
    """An export folder's ``config.json`` (timm's format), checked.

    Raises:
        ValueError: no config.json, invalid JSON, or a missing or mistyped ``architecture``,
            ``num_classes``, ``pretrained_cfg`` or ``model_args``.
    """
    cfg_file = Path(folder) / 'config.json'
    if not cfg_file.is_file():
        raise ValueError(
            f'{folder} has no config.json: expected a folder written by timm_joint.hub.save_pretrained '
            f'(e.g. runs/NAME/export/best)')
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{cfg_file} is not valid JSON: {e}') from e
    if not isinstance(config, dict):
        raise ValueError(f'{cfg_file}: expected a JSON object, got {type(config).__name__}')
    for key, kind in (('architecture', str), ('num_classes', int), ('pretrained_cfg', dict)):
        if key not in config:
            raise ValueError(f"{cfg_file}: missing key '{key}' (timm's config.json format)")
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise ValueError(f"{cfg_file}: '{key}' must be a {kind.__name__}, got {config[key]!r}")
    if not isinstance(config.get('model_args', {}), dict):
        raise ValueError(f"{cfg_file}: 'model_args' must be an object, got {config['model_args']!r}")
    return config


def create_from_config(
        config: Dict[str, Any],
        *,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> nn.Module:
    """The network a ``config.json`` describes, without weights, as ``timm.create_model('local-dir:...')``
    builds it: ``model_args`` (an earlier GradResNet's filled in by ``upgrade_model_args``), the number
    of classes, and the stored ``pretrained_cfg``.

    Args:
        config: A checked config (``read_config``).
        model_name: The name to create (a tag of the same architecture); default its ``architecture``.
        num_classes: Overrides the config's classes.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``device='meta'`` to compare shapes only).
    """
    import timm
    from .models.gradresnet import upgrade_model_args
    arch = config['architecture']
    model_args = upgrade_model_args(config.get('model_args') or {}, arch)
    # As timm's own loader: model_args first, then the config's count; an explicit num_classes wins.
    model_args.setdefault('num_classes', config['num_classes'])
    if num_classes is not None:
        model_args['num_classes'] = num_classes
    return timm.create_model(model_name or arch, pretrained=False,
                             pretrained_cfg_overlay=dict(config.get('pretrained_cfg') or {}), **model_args, **kwargs)


# -- the one loader ----------------------------------------------------------------------------------

def is_download_error(e: BaseException) -> bool:
    """Whether fetching weights failed (no network, no cache, the Hub refused), not the model itself."""
    mod = (type(e).__module__ or '').split('.')[0]
    return (isinstance(e, (OSError, ConnectionError, TimeoutError)) or mod in _DOWNLOAD_MODULES
            or (isinstance(e, RuntimeError) and 'pretrained weights' in str(e)))


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights that are not published or cannot be fetched, with what to do instead.

    A RuntimeError, as timm's own loaders raise for weights they cannot get; the message is complete
    on its own (nothing is chained to it).
    """


def _hub_offline() -> bool:
    from huggingface_hub import constants
    is_offline = getattr(constants, 'is_offline_mode', None)  # huggingface_hub >= 1.0 reads it when asked
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


def check_hub_weights(
        hub_id: str,
        *,
        model: str,
        hint: str,
        filenames: Tuple[str, ...] = (SAFE_WEIGHTS, 'pytorch_model.bin'),
        timeout: float = 10.,
) -> Optional[str]:
    """Ask the Hugging Face Hub once, without retries, whether a repo holds weights, before timm's
    download does.

    timm's loader asks for each weights file in turn and huggingface_hub retries a failed request
    five times with back-off: an unpublished repo or an unreachable Hub took a minute of retry
    lines before its error. One HEAD request per file here (the first found ends it) answers in
    seconds.

    Args:
        hub_id: ``ORG/NAME`` or ``ORG/NAME@REVISION``, as a pretrained cfg's ``hf_hub_id``.
        model: The model name the message names (e.g. ``gradresnet18_joint.cifar10``).
        hint: A sentence that says what to do instead, ending the messages.
        filenames: The weights files timm looks for, in its order.
        timeout: Seconds to wait for the Hub's answer.

    Returns:
        None when the Hub has the weights (timm downloads them, or checks its cached copy is
        current), or the path of a cached copy to load when the Hub cannot be reached.

    Raises:
        PretrainedUnavailableError: the repo or its weights are not on the Hub, the repo is gated,
            or the Hub is unreachable (or ``HF_HUB_OFFLINE`` is set) and the weights are not cached.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = hub_id.partition('@')
    revision = revision or None
    cached = None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str):
            cached = found
            break
    if _hub_offline():
        if cached is not None:
            return None  # timm reads the cache without asking the Hub
        raise PretrainedUnavailableError(
            f'pretrained weights for {model!r} are not in the local Hugging Face cache and HF_HUB_OFFLINE is '
            f'set (repo {repo_id!r}): unset HF_HUB_OFFLINE to download them. {hint}')
    import inspect
    no_retry = ({'retry_on_errors': False}
                if 'retry_on_errors' in inspect.signature(get_hf_file_metadata).parameters else {})
    for name in filenames:
        url = hf_hub_url(repo_id, name, revision=revision)
        try:
            get_hf_file_metadata(url, timeout=timeout, **no_retry)
            return None
        except GatedRepoError:
            if cached is not None:
                return None
            raise PretrainedUnavailableError(
                f'the Hugging Face Hub repo {repo_id!r} of {model!r} is gated: accept its conditions on the Hub '
                f'and log in (hf auth login, or HF_TOKEN). {hint}') from None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise PretrainedUnavailableError(
                f'pretrained weights for {model!r} are not published: the Hugging Face Hub has no repo '
                f'{hub_id!r}. {hint}') from None
        except EntryNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001  (the network boundary: DNS, refused, timeout, HTTP 5xx)
            if not is_download_error(e):
                raise
            status = getattr(getattr(e, 'response', None), 'status_code', None)
            if status in (401, 404):  # the Hub answers 401 to an anonymous client for a repo that does not exist
                raise PretrainedUnavailableError(
                    f'pretrained weights for {model!r} are not published: the Hugging Face Hub answered {status} for '
                    f'repo {hub_id!r}. {hint}') from None
            if cached is not None:
                import logging
                logging.getLogger(__name__).warning(
                    f'the Hugging Face Hub is unreachable ({type(e).__name__}): loading the cached weights of {model!r}')
                return cached
            first_line = (str(e).strip().splitlines() or [''])[0]
            raise PretrainedUnavailableError(
                f'could not reach the Hugging Face Hub for the pretrained weights of {model!r} (repo {repo_id!r}: '
                f'{type(e).__name__}: {first_line}) and they are not in the local cache: connect and retry. '
                f'{hint}') from None
    raise PretrainedUnavailableError(
        f'pretrained weights for {model!r} are not published: the Hugging Face Hub repo {hub_id!r} holds none of '
        f'{", ".join(filenames)}. {hint}')


def _base_arch(name: str) -> str:
    return name.split('.')[0]


def _takes_raw_pixels(config: Optional[Dict[str, Any]]) -> bool:
    """Whether weights were trained by this project on [0, 1] pixels, whatever their config's mean/std
    says: train.py records a ``timm_joint`` entry in the config.json of every export, and a bare
    state-dict file carries no config (``None``) and is taken for one of its checkpoints."""
    return config is None or 'timm_joint' in config


def _num_classes_from(state_dict: Dict[str, torch.Tensor], model_name: str) -> Optional[int]:
    """The classes of a state dict's classifier (timm's pretrained cfg names its key)."""
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(_base_arch(model_name)) or {}
        classifier = cfg.classifier if hasattr(cfg, 'classifier') else cfg.get('classifier')
    except Exception:  # noqa: BLE001  (an unknown name: fall back to the usual keys)
        classifier = None
    for prefix in ([classifier] if classifier else []) + ['fc', 'head', 'head.fc', 'classifier']:
        for key in (f'{prefix}.weight', f'model.{prefix}.weight'):
            if key in state_dict and state_dict[key].ndim == 2:
                return int(state_dict[key].shape[0])
    return None


def _resolve_source(model_name: Union[str, Path], checkpoint: Optional[PathLike]) -> Tuple[str, Optional[str]]:
    """(model name, source of the weights or None for the registry's) with a folder or ``ORG/NAME``
    given as the model name turned into ``local-dir:`` / ``hf-hub:``."""
    import timm
    name = str(model_name)
    if checkpoint is not None:
        return name, str(checkpoint)
    if name.startswith(('local-dir:', 'hf-hub:')):
        return name, name
    if timm.is_model(_base_arch(name)) and not isinstance(model_name, Path):
        return name, None
    if isinstance(model_name, Path) or Path(name).is_dir():
        return f'local-dir:{name}', f'local-dir:{name}'
    if REPO_ID.match(name):
        return f'hf-hub:{name}', f'hf-hub:{name}'
    return name, None


def _create_pretrained(name: str, model_name: str, num_classes: Optional[int]) -> nn.Module:
    """A registry or ``hf-hub:`` model with its pretrained weights, through timm's loaders."""
    import timm
    try:
        return timm.create_model(name, pretrained=True, **({'num_classes': num_classes} if num_classes else {}))
    except PretrainedUnavailableError as e:
        raise ValueError(str(e)) from None  # complete as it is: it says what to pass instead
    except Exception as e:
        if is_download_error(e):
            raise ValueError(
                f'could not get pretrained weights for {name!r} ({type(e).__name__}: {e}). Offline or '
                f'unpublished: pass a checkpoint (an export folder written by train_joint.py, local-dir:PATH, '
                f'or a state-dict file)') from e
        if isinstance(e, RuntimeError) and ('state_dict' in str(e) or 'size mismatch' in str(e)):
            raise ValueError(f'the checkpoint {name!r} does not fit model {model_name!r}: {e}') from e
        raise


def load_model(
        model_name: Union[str, Path],
        checkpoint: Optional[PathLike] = None,
        *,
        num_classes: Optional[int] = None,
        device: Union[str, torch.device] = 'cpu',
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a model and load its weights, refusing a checkpoint that does not fit.

    ``checkpoint`` is an export folder (``config.json`` + ``model.safetensors``, as ``hub.save_pretrained``
    writes), ``local-dir:PATH``, ``hf-hub:ORG/NAME``, or a state-dict file (``read_state_dict``). Without
    one, ``model_name`` itself may be a ``local-dir:``/``hf-hub:`` name, a folder, or ``ORG/NAME`` on the
    Hub; a registry name gets its pretrained weights.

    Every model returned takes [0, 1] pixels. A plain classifier (not a ``JointDensityMixin``) with
    weights from elsewhere (the timm registry, the Hub, a folder without train.py's ``timm_joint``
    entry in its config.json) gets its configured mean/std applied inside (``joint.PixelInput``); one
    trained by this project (an export with that entry, or a state-dict file) saw raw pixels in
    training and is used as is.

    Args:
        model_name: A timm model name, or where the model is (see above).
        checkpoint: Where its weights are (see above).
        num_classes: Classes of the model (default: the checkpoint's).
        device: Where the model goes.

    Returns:
        (model in eval mode on ``device``, info: name, checkpoint, source, folder (of the weights, where
        training records are looked for), config (config.json or None), architecture, num_params).

    Raises:
        ValueError: a missing folder or file, weights that cannot be read safely, an architecture other
            than ``model_name``, a state dict with missing, unexpected or mis-shaped tensors, or
            registry weights that cannot be downloaded.
    """
    import timm
    import timm_joint  # noqa: F401  (registers the GradResNet names)
    from .joint import JointDensityMixin, JointDensityWrapper, PixelInput

    model_name, source = _resolve_source(model_name, checkpoint)
    info: Dict[str, Any] = {'name': model_name, 'checkpoint': None if checkpoint is None else str(checkpoint),
                            'config': None, 'folder': None, 'source': source}
    num_classes = num_classes or None  # 0 or None: the checkpoint's
    config: Optional[Dict[str, Any]] = {}  # registry and Hub weights: their config's mean/std apply
    if source is None or source.startswith('hf-hub:'):
        model = _create_pretrained(source or model_name, model_name, num_classes)
        # A Hub repository names its architecture in its config; a registry name is one.
        hub_architecture = getattr(model, 'pretrained_cfg', {}).get('architecture', model_name)
        info['architecture'] = hub_architecture if source else model_name
    else:
        path = Path(source[len('local-dir:'):] if source.startswith('local-dir:') else source)
        if not path.exists():
            raise ValueError(f'checkpoint {str(path)!r} does not exist')
        if path.is_dir():
            config = read_config(path)
            arch = config['architecture']
            if model_name.startswith(('local-dir:', 'hf-hub:')):
                model_name = arch
            if _base_arch(arch) != _base_arch(model_name):
                raise ValueError(
                    f'the checkpoint {str(path)!r} holds a {arch!r}, which does not fit --model {model_name!r}')
            state_dict = read_state_dict(path)
            model = create_from_config(config, model_name=model_name, num_classes=num_classes)
            info.update(config=config, folder=str(path))
        else:
            state_dict = read_state_dict(path)
            n_cls = num_classes or _num_classes_from(state_dict, model_name)
            model = timm.create_model(model_name, pretrained=False, **({'num_classes': n_cls} if n_cls else {}))
            info['folder'] = str(path.parent)
            config = None
        # An export of a JointDensityWrapper holds the timm model under 'model.' and an energy head.
        if any(k.startswith('energy_head.') for k in state_dict) and not isinstance(model, JointDensityMixin):
            model = JointDensityWrapper(model, warn_untrained=False)
        check_fits(model.state_dict(), state_dict, source=f'the checkpoint {str(path)!r}',
                   target=f'model {model_name!r}', hint='. Check --model (and --num-classes) against the checkpoint.')
        model.load_state_dict(state_dict, strict=True)
        info['architecture'] = model_name
    if not isinstance(model, JointDensityMixin) and not _takes_raw_pixels(config):
        model = PixelInput.if_needed(model)
    info['num_params'] = int(sum(p.numel() for p in model.parameters()))
    return model.to(device).eval(), info
