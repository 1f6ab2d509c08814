"""Save, load and publish models in timm's Hugging Face Hub layout.

A model folder holds ``model.safetensors`` and ``config.json`` in timm's format (architecture,
num_classes, num_features, pretrained_cfg, model_args), so ``timm.create_model('local-dir:PATH')``
and ``timm.create_model('hf-hub:ORG/NAME')`` rebuild it exactly (after ``import timm_joint``).

Publishing turns such a folder and the ``results.json`` that ``python -m timm_joint.evaluate`` wrote
for it into a Hub-ready folder (weights, config, a model card rendered from ``hub_cards/``), and
optionally uploads it::

    python -m timm_joint.hub publish --checkpoint runs/NAME/export/best \\
        --results results/NAME.json --out hub/NAME --push --repo-id ORG/NAME

Every number in the card comes from ``results.json`` (checked by ``timm_joint.results``). Weights are
only ever read by ``timm_joint.io.read_state_dict``: safetensors, or ``torch.load(weights_only=True)``,
which refuses pickles that would run code. Models load with ``timm_joint.io.load_model``. The Hub token
is left to huggingface_hub (``HF_TOKEN`` or ``hf auth login``): it is never printed, and a
published folder that contains it is refused.
"""
import argparse
import json
import os
import re
import shutil
import string
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import yaml
from huggingface_hub import HfApi

from . import results as results_schema
from .cli import check_out_dir, error_line, program_name
from .io import (
    REPO_ID, SAFE_WEIGHTS, atomic_dir, check_fits, create_from_config, read_config, read_state_dict, train_args_files,
    write_state_dict,
)
from .resources import resource_dir
from .results import NA, is_number

__all__ = [
    'save_pretrained', 'load_export', 'load_results', 'validate_results',
    'results_table', 'render_model_card', 'publish', 'push_to_hub', 'main',
]

# Templates live in hub_cards/ at the repository root; a wheel carries them inside the package.
CARD_DIR = resource_dir('hub_cards')
CARD_TEMPLATE = CARD_DIR / 'model_card.md'


CITATION = """@article{thiry2024classification,
  title   = {Classification-denoising networks},
  author  = {Thiry, Louis and Guth, Florentin},
  journal = {arXiv preprint arXiv:2410.03505},
  year    = {2024},
}"""

# Dataset names as the evaluation writes them (timm's 'torch/cifar10', 'hfds/...', or bare) mapped to
# (Hugging Face dataset id, display name, pretrained tag used by the registered configs).
_DATASETS = {
    'cifar10': ('uoft-cs/cifar10', 'CIFAR-10', 'cifar10'),
    'imagenet': ('ILSVRC/imagenet-1k', 'ImageNet-1k', 'in1k'),
    'imagenet1k': ('ILSVRC/imagenet-1k', 'ImageNet-1k', 'in1k'),
    'in1k': ('ILSVRC/imagenet-1k', 'ImageNet-1k', 'in1k'),
    'ilsvrc2012': ('ILSVRC/imagenet-1k', 'ImageNet-1k', 'in1k'),
}

# Keys of a recorded training configuration that must never reach a card.
_SECRET_KEY = re.compile(r'token|secret|password|passwd|api_?key|credential|auth', re.IGNORECASE)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


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
        model_args: Constructor arguments beyond the entry point's defaults (e.g. num_classes); a
            GradResNet's architecture arguments (``arch_args``) are always recorded.
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
        # A model that names its architecture (GradResNet.arch_args) records all of it, so the folder
        # rebuilds this network whatever the defaults become; explicit model_args take precedence.
        'model_args': _jsonable({**(getattr(model, 'arch_args', None) or {}), **(model_args or {})}),
    }
    config.update(_jsonable(extra_config or {}))
    with atomic_dir(path) as tmp:
        write_state_dict(model.state_dict(), tmp / SAFE_WEIGHTS)
        with open(tmp / 'config.json', 'w') as f:
            json.dump(config, f, indent=2)
    return path


# -- reading an export ------------------------------------------------------------------------------

def load_export(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a folder written by ``save_pretrained`` and check that its weights rebuild the model.

    Weights come from ``model.safetensors``, or from a ``.bin``/``.pth`` read with
    ``torch.load(weights_only=True)`` (``io.read_state_dict``: a pickle that would run code is refused
    with a ValueError).
    The architecture is rebuilt from ``config.json`` and the weights loaded strictly, so a folder
    whose config and weights disagree fails here rather than on a user's machine.

    Args:
        path: The export folder (e.g. ``runs/NAME/export/best``).

    Returns:
        (state_dict, config): the tensors and the parsed ``config.json``.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'checkpoint {str(folder)!r} is a file: expected an export folder (config.json and '
                         f'model.safetensors, e.g. runs/NAME/export/best)')
    if not folder.is_dir():
        raise FileNotFoundError(f'checkpoint folder {folder} does not exist (expected e.g. runs/NAME/export/best)')
    config = read_config(folder)
    state_dict = read_state_dict(folder)
    import timm  # the registry: importing this package already registered GradResNet
    arch = config['architecture']
    if not timm.is_model(arch):
        raise ValueError(f"config.json names architecture {arch!r}, which timm does not know "
                         f"(is the package that registers it imported?)")
    # Structure only: the meta device allocates nothing; keys and shapes are compared.
    model = create_from_config(config, device='meta')
    check_fits(model.state_dict(), state_dict, source=f'the weights in {folder}',
               target=f'{arch}({config.get("model_args")})')
    return state_dict, config


# -- results.json ---------------------------------------------------------------------------------

def validate_results(results: Any) -> Dict[str, Any]:
    """Check an evaluation's results for what a card uses (``timm_joint.results.validate_results``).

    Required: ``schema_version`` (1), ``model.name``, ``dataset.name`` ('' for an image folder),
    ``dataset.split``, ``dataset.num_images``, ``accuracy`` and ``psnr.blind``, each with at least
    one measured value; every other key present is checked as the evaluation writes it.

    Returns:
        The same dict.

    Raises:
        ValueError: A key is missing or has the wrong type; the message names it.
    """
    return results_schema.validate_results(results, required=results_schema.CARD_REQUIRED,
                                           measured=('accuracy', 'psnr.blind'))


def load_results(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a ``results.json`` written by ``python -m timm_joint.evaluate`` and check it for a card."""
    return results_schema.load_results(path, required=results_schema.CARD_REQUIRED,
                                       measured=('accuracy', 'psnr.blind'))


_PSNR_COLUMNS = (
    ('blind', 'PSNR blind (dB)'),
    ('cond_true', 'PSNR cond. true class (dB)'),
    ('cond_pred', 'PSNR cond. predicted class (dB)'),
)


def results_table(results: Dict[str, Any], digits: int = 2) -> str:
    """Markdown table of top-1 accuracy and PSNR per noise level, from an evaluation's results.

    One row per noise level found in ``accuracy`` or ``psnr`` (0-255 units, ascending); a cell is
    '-' where that level was not measured and 'n/a' where results.json says so. Conditional PSNR
    columns appear only when they hold at least one number.

    Args:
        results: A validated ``results.json`` dict.
        digits: Decimals shown.

    Returns:
        The table, one row per line.
    """
    validate_results(results)
    columns = [('accuracy', results['accuracy'], 'Top-1 (%)')]
    columns += [(k, results['psnr'][k], title) for k, title in _PSNR_COLUMNS
                if any(is_number(v) for v in results['psnr'].get(k, {}).values())]
    keys = {k for _, table, _ in columns for k in table}
    rows = sorted(keys, key=float)
    lines = ['| sigma (0-255) | ' + ' | '.join(title for _, _, title in columns) + ' |',
             '|---:|' + '---:|' * len(columns)]
    for k in rows:
        cells = [('-' if k not in table else NA if table[k] == NA else f'{table[k]:.{digits}f}')
                 for _, table, _ in columns]
        lines.append(f'| {k} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _flatten_numbers(node: Any, prefix: str) -> List[Tuple[str, float]]:
    if is_number(node):
        return [(prefix, node)]
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += _flatten_numbers(v, f'{prefix}.{k}' if prefix else str(k))
        return out
    return []


def _extra_results(results: Dict[str, Any]) -> str:
    # The other sections have layouts of their own (grids of attacks, OOD scores...): list every
    # number they hold by its key path, with the unit results.json gives for the section.
    units = results.get('units') if isinstance(results.get('units'), dict) else {}

    def unit_of(path: str) -> str:
        section = path.split('.')[0]
        key = {'noisy_psnr': 'psnr', 'robustness': 'accuracy'}.get(section, section)
        if section == 'ood':
            key = 'auroc' if '.auroc.' in path else ''
        unit = units.get(key, '') if key else ''
        return unit if isinstance(unit, str) else ''

    rows = []
    for key in ('noisy_psnr', 'ssim', 'ece', 'ood', 'robustness'):
        if key in results:
            rows += [(path, value, unit_of(path)) for path, value in _flatten_numbers(results[key], key)]
    if not rows:
        return ''
    lines = ['Further measurements from the same evaluation (key paths of `results.json`):', '',
             '| measurement | value | unit |', '|---|---:|---|']
    lines += [f'| `{k}` | {v:.4g} | {u} |' for k, v, u in rows]
    return '\n'.join(lines) + '\n'


# -- the card -------------------------------------------------------------------------------------

def _dataset_info(name: str) -> Tuple[Optional[str], str, Optional[str]]:
    """(Hub dataset id or None, display name, pretrained tag or None) of an evaluation's dataset name."""
    if not name:
        return None, 'an image folder', None  # timm's '' dataset: ImageFolder under --data-dir
    base = name.split('/')[-1].lower().replace('-', '').replace('_', '')
    if base in _DATASETS:
        return _DATASETS[base]
    return name.split('/')[-1], name, base


def default_repo_id(config: Dict[str, Any], results: Dict[str, Any]) -> str:
    """``{HF_HUB_ORG}/{architecture}.{tag}``: the id the registered pretrained configs point at."""
    from .models import HF_HUB_ORG
    tag = _dataset_info(results['dataset']['name'])[2]
    if tag is None:
        raise ValueError('results.json names no dataset (an image folder): pass --repo-id ORG/NAME')
    return f"{HF_HUB_ORG}/{config['architecture']}.{tag}"


def _model_index(results: Dict[str, Any], name: str) -> List[Dict[str, Any]]:
    hf_id, pretty, _ = _dataset_info(results['dataset']['name'])
    dataset = {'name': pretty, 'type': hf_id or 'imagefolder', 'split': results['dataset']['split']}

    def by_sigma(table):
        # 'n/a' cells are not metrics: the model-index lists measured numbers only.
        return sorted(((k, v) for k, v in table.items() if is_number(v)), key=lambda kv: float(kv[0]))

    cls_metrics = [{'type': 'accuracy', 'name': f'Top-1 accuracy, sigma={k}/255', 'value': v}
                   for k, v in by_sigma(results['accuracy'])]
    den_metrics = [{'type': 'psnr', 'name': f'PSNR {variant}, sigma={k}/255', 'value': v}
                   for variant, _ in _PSNR_COLUMNS if variant in results['psnr']
                   for k, v in by_sigma(results['psnr'][variant])]
    return [{'name': name, 'results': [
        {'task': {'type': 'image-classification', 'name': 'Image Classification'},
         'dataset': dict(dataset), 'metrics': cls_metrics},
        {'task': {'type': 'image-to-image', 'name': 'Image Denoising'},
         'dataset': dict(dataset), 'metrics': den_metrics},
    ]}]


def _find_train_args(folder: Path, config: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    for candidate in train_args_files(folder):
        if candidate.is_file():
            try:
                args = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError as e:
                raise ValueError(f'{candidate} is not valid YAML: {e}') from e
            if isinstance(args, dict):
                return args, candidate.name
    for key in ('train_args', 'args'):
        if isinstance(config.get(key), dict):
            return config[key], f'config.json ({key})'
    return None, None


def _scrub(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _scrub(v) for k, v in node.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(node, list):
        return [_scrub(v) for v in node]
    return node


def _recipe(folder: Path, config: Dict[str, Any]) -> Tuple[str, str]:
    meta = ''
    if isinstance(config.get('timm_joint'), dict):
        # What train_joint.py stores in config.json about the objective (task, lambda, noise ranges).
        dumped = yaml.safe_dump(_jsonable(_scrub(config['timm_joint'])), sort_keys=False).rstrip()
        meta = f'\n\nObjective, as stored in `config.json` (`timm_joint`):\n\n```yaml\n{dumped}\n```'
    args, source = _find_train_args(folder, config)
    if args is None:
        return 'Training arguments: not recorded (no `args.yaml` beside the export).' + meta, 'not recorded'
    args = _scrub(args)
    if isinstance(args.get('command'), str):
        command = args['command']
    elif isinstance(args.get('argv'), list):
        command = ' '.join(str(a) for a in args['argv'])
    elif isinstance(args.get('config'), str) and args['config']:
        command = f"python train_joint.py -c {args['config']}"
    else:
        command = 'not recorded'
    dumped = yaml.safe_dump(_jsonable(args), sort_keys=False, default_flow_style=False).rstrip()
    recipe = (f'Training arguments, as recorded in `{source}` (the config file\'s values with any '
              f'command-line overrides):\n\n```yaml\n{dumped}\n```')
    return recipe + meta, command


def render_model_card(
        config: Dict[str, Any],
        results: Dict[str, Any],
        *,
        repo_id: str,
        checkpoint: Optional[Union[str, Path]] = None,
        template: Optional[Union[str, Path]] = None,
) -> str:
    """Render the README.md (model card) of a published model.

    The front matter is YAML written by ``yaml.safe_dump`` (so it always parses); the body is the
    template in ``hub_cards/`` with ``$name`` placeholders. Metrics come from ``results`` only.

    Args:
        config: The export's ``config.json``.
        results: The validated ``results.json``.
        repo_id: The Hub id the card's usage examples load from (``ORG/NAME``).
        checkpoint: The export folder, searched for the recorded training arguments.
        template: A card template (defaults to ``hub_cards/model_card.md``).

    Returns:
        The card's text.
    """
    validate_results(results)
    template = Path(template) if template is not None else CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f'model card template {template} not found (expected hub_cards/model_card.md '
                                f'in the source tree or timm_joint/hub_cards/ in an installed package, or '
                                f'pass --template)')
    arch = config['architecture']
    pcfg = config.get('pretrained_cfg') or {}
    hf_id, pretty, tag = _dataset_info(results['dataset']['name'])
    name = repo_id.split('/')[-1]
    front = {
        'library_name': 'timm',
        'license': pcfg.get('license', 'apache-2.0'),
        'datasets': [hf_id] if hf_id else [],
        'tags': ['timm', 'image-classification', 'image-denoising', 'timm-joint', 'gradresnet'],
        'pipeline_tag': 'image-classification',
        'model-index': _model_index(results, name),
    }
    front_matter = yaml.safe_dump(front, sort_keys=False, default_flow_style=False, allow_unicode=True)

    # The usage example's noise level is one the card reports (the middle blind-PSNR level).
    levels = sorted((k for k, v in results['psnr']['blind'].items() if is_number(v)), key=float)
    sigma_255 = levels[len(levels) // 2]
    in_size = pcfg.get('input_size') or [3, 32, 32]
    registered = ''
    try:
        from timm.models import get_pretrained_cfg
        reg = get_pretrained_cfg(f'{arch}.{tag}') if tag else None
        if (reg is not None and getattr(reg, 'hf_hub_id', None) == repo_id
                and getattr(reg, 'num_classes', None) == config['num_classes']):
            registered = (f"\n# the same weights through the registered pretrained config:\n"
                          f"model = timm.create_model('{arch}.{tag}', pretrained=True).eval()")
    except (RuntimeError, ValueError):
        pass
    recipe, command = _recipe(Path(checkpoint), config) if checkpoint is not None else (
        'Training arguments: not recorded.', 'not recorded')
    mapping = {
        'front_matter': front_matter,
        'name': name,
        'repo_id': repo_id,
        'architecture': arch,
        'num_classes': str(config['num_classes']),
        'input_size': ' x '.join(str(s) for s in in_size),
        'batch_shape': ', '.join(['1'] + [str(s) for s in in_size]),
        'registered': registered,
        'sigma_255': str(sigma_255),
        'dataset': pretty,
        'dataset_id': hf_id or '',
        'split': results['dataset']['split'],
        'num_images': str(results['dataset']['num_images']),
        'evaluated_model': results['model']['name'],
        'eval_command': results['command'] if isinstance(results.get('command'), str) else 'not recorded',
        'results_table': results_table(results),
        'extra_results': _extra_results(results),
        'train_command': command,
        'recipe': recipe,
        'citation': CITATION,
    }
    try:
        return string.Template(template.read_text()).substitute(mapping)
    except (KeyError, ValueError) as e:
        raise ValueError(f'model card template {template} has an unknown or malformed placeholder: {e}') from e


# -- publish --------------------------------------------------------------------------------------

def _known_tokens() -> List[str]:
    """Tokens huggingface_hub would use, to make sure none is ever written (values are never shown)."""
    tokens = [os.environ.get('HF_TOKEN'), os.environ.get('HUGGING_FACE_HUB_TOKEN')]
    try:
        from huggingface_hub import get_token
        tokens.append(get_token())
    except Exception:  # no login, unreadable token file: nothing to guard against
        pass
    return sorted({t for t in tokens if isinstance(t, str) and len(t) >= 8})


def _assert_no_secret(folder: Path, extra_tokens: Sequence[str] = ()) -> None:
    tokens = _known_tokens() + [t for t in extra_tokens if t]
    for file in sorted(p for p in folder.rglob('*') if p.is_file()):
        data = file.read_bytes()
        for token in tokens:
            if token.encode() in data:
                raise RuntimeError(f'a Hugging Face token was found in {file.name}; refusing to publish it')


def _check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or '..' in repo_id or len(repo_id) > 96:
        raise ValueError(f'repo id must look like ORG/NAME (letters, digits, ".", "_", "-"), got {repo_id!r}')
    return repo_id


def publish(
        checkpoint: Union[str, Path],
        results: Union[str, Path, Dict[str, Any]],
        out: Union[str, Path],
        *,
        repo_id: Optional[str] = None,
        overwrite: bool = False,
        template: Optional[Union[str, Path]] = None,
) -> Path:
    """Write a Hub-ready folder: ``model.safetensors``, timm's ``config.json`` and a ``README.md`` card.

    Args:
        checkpoint: An export folder written by ``save_pretrained`` (e.g. ``runs/NAME/export/best``).
        results: Its ``results.json`` (a path or the parsed dict).
        out: The folder to write; written whole and atomically.
        repo_id: The Hub id the card's examples load from; defaults to the id the registered
            pretrained config points at (``{HF_HUB_ORG}/{architecture}.{tag}``).
        overwrite: Replace a non-empty ``out``.
        template: Card template (defaults to ``hub_cards/model_card.md``).

    Returns:
        The folder path.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    res = validate_results(results) if isinstance(results, dict) else load_results(results)
    check_out_dir(out, '--out')
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f'--out {out} exists and is not empty: pass --overwrite to replace it')
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ValueError(f'--out {out} would replace the checkpoint folder {checkpoint} itself')

    state_dict, config = load_export(checkpoint)
    _check_model_matches(res, config)
    repo_id = _check_repo_id(repo_id if repo_id is not None else default_repo_id(config, res))
    card = render_model_card(config, res, repo_id=repo_id, checkpoint=checkpoint, template=template)

    with atomic_dir(out) as tmp:
        if (checkpoint / SAFE_WEIGHTS).is_file():
            shutil.copyfile(checkpoint / SAFE_WEIGHTS, tmp / SAFE_WEIGHTS)  # the very bytes that were verified
        else:
            write_state_dict(state_dict, tmp / SAFE_WEIGHTS)
        with open(tmp / 'config.json', 'w') as f:
            json.dump(config, f, indent=2)
        (tmp / 'README.md').write_text(card)
        _assert_no_secret(tmp)
    return out


def _check_model_matches(results: Dict[str, Any], config: Dict[str, Any]) -> None:
    # A results.json that names a different registered architecture belongs to another model.
    import timm
    arch = results['model'].get('architecture')
    if isinstance(arch, str) and arch and arch != config['architecture']:
        raise ValueError(f"results.json is for architecture {arch!r} but the checkpoint is a {config['architecture']!r}")
    name = results['model']['name']
    if ':' in name or '/' in name:
        return  # a local-dir: / hf-hub: name: nothing registered to compare against
    base = name.split('.')[0]
    if timm.is_model(base) and base != config['architecture']:
        raise ValueError(f"results.json is for model {name!r} but the checkpoint is a {config['architecture']!r}")
    n = results['model'].get('num_classes')
    if n is not None and n != config['num_classes']:
        raise ValueError(f"results.json reports num_classes={n} but the checkpoint has {config['num_classes']}")


# -- push -----------------------------------------------------------------------------------------

def push_to_hub(
        folder: Union[str, Path],
        repo_id: str,
        *,
        private: bool = False,
        commit_message: Optional[str] = None,
        dry_run: bool = False,
        token: Optional[str] = None,
        print_fn: Callable[[str], None] = print,
) -> Optional[str]:
    """Upload a published folder to the Hugging Face Hub (``create_repo`` then ``upload_folder``).

    The token is huggingface_hub's business: ``token=None`` lets it use ``HF_TOKEN`` or the
    standard login; a given token is handed to ``HfApi`` and nowhere else, and never printed.

    Args:
        folder: The folder written by ``publish``.
        repo_id: ``ORG/NAME``.
        private: Create the repo private; refuse to upload into an existing public one.
        commit_message: The commit message (a default names the model).
        dry_run: Print what would be uploaded, where and with which message; touch nothing.
        token: Optional token for huggingface_hub.
        print_fn: Where the report goes.

    Returns:
        The commit URL, or None for a dry run.
    """
    folder = Path(folder)
    _check_repo_id(repo_id)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    if not files:
        raise FileNotFoundError(f'{folder} is empty: nothing to upload')
    if commit_message is None:
        arch = json.loads((folder / 'config.json').read_text()).get('architecture', 'model') \
            if (folder / 'config.json').is_file() else 'model'
        commit_message = f'Upload {arch} (timm-joint)'
    visibility = 'private' if private else 'public'
    if dry_run:
        print_fn('dry run: nothing is uploaded, no repo is created')
        print_fn(f'repo: {repo_id} (model, {visibility})')
        print_fn(f'commit message: {commit_message}')
        found = bool(token or _known_tokens())
        print_fn('token: ' + ('found by huggingface_hub (not shown)' if found
                              else 'none found: run `hf auth login` or set HF_TOKEN'))
        print_fn(f'files from {folder}:')
        for name in files:
            print_fn(f'  {name} ({(folder / name).stat().st_size} bytes)')
        return None
    from . import __version__
    api = HfApi(token=token, library_name='timm-joint', library_version=__version__)
    api.create_repo(repo_id, private=private, repo_type='model', exist_ok=True)
    if private:
        info = api.repo_info(repo_id, repo_type='model')
        if not getattr(info, 'private', False):
            raise RuntimeError(f'{repo_id} already exists and is public; refusing a --private upload into it')
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type='model', commit_message=commit_message)
    url = getattr(commit, 'commit_url', None) or f'https://huggingface.co/{repo_id}'
    print_fn(f'uploaded {len(files)} files to {repo_id} ({visibility}): {url}')
    return url


# -- command line ---------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name('timm_joint.hub'), description='Publish timm-joint models to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser(
        'publish', help='write a Hub-ready folder (weights, config, model card) and optionally push it',
        description='Write model.safetensors, config.json and README.md (rendered from hub_cards/ with the '
                    'numbers of --results) to --out; with --push, upload it. The token comes from HF_TOKEN '
                    'or `hf auth login` and is never printed.')
    p.add_argument('--checkpoint', required=True, help='export folder written by training (runs/NAME/export/best)')
    p.add_argument('--results', required=True, help='results.json written by python -m timm_joint.evaluate')
    p.add_argument('--out', required=True, help='output folder (refused if it exists and is not empty)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
    p.add_argument('--repo-id', default=None, help='ORG/NAME on the Hub (default: the registered id, '
                                                   'timm-joint/ARCH.TAG)')
    p.add_argument('--push', action='store_true', help='upload --out to --repo-id')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--dry-run', action='store_true', help='with --push: list what would be uploaded, upload nothing')
    p.add_argument('--commit-message', default=None, help='commit message of the upload')
    p.add_argument('--template', default=None, help='model card template (default: hub_cards/model_card.md)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-joint-hub`` / ``python -m timm_joint.hub``: returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == 'publish':
        if (args.dry_run or args.private or args.commit_message) and not args.push:
            parser.error('--dry-run, --private and --commit-message go with --push --repo-id ORG/NAME')
        if args.push and not args.repo_id:
            parser.error('--push needs --repo-id ORG/NAME')
        try:
            if args.repo_id:
                _check_repo_id(args.repo_id)
            out = publish(args.checkpoint, args.results, args.out, repo_id=args.repo_id,
                          overwrite=args.overwrite, template=args.template)
            print(f'wrote {out}: ' + ', '.join(sorted(p.name for p in out.iterdir())))
        except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
            print(error_line('timm_joint.hub', e), file=sys.stderr)
            return 2
        if args.push:
            try:
                push_to_hub(out, args.repo_id, private=args.private, commit_message=args.commit_message,
                            dry_run=args.dry_run)
            except Exception as e:  # noqa: BLE001  (the network boundary: HTTP, DNS, offline, auth...)
                # The folder is written; say what failed, without a traceback. These messages hold no token.
                print(error_line('timm_joint.hub', f'upload of {out} to {args.repo_id} failed ({type(e).__name__}): {e}'),
                      file=sys.stderr)
                return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
