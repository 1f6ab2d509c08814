"""The schema of an evaluation's ``results.json``: one validator, one "n/a".

``python -m timm_joint.evaluate`` writes the file (and checks it with every key required before it
writes); model cards and tables read it (``timm_joint.hub``), requiring only what they use. Both go
through ``validate_results``, so a key means the same thing, with the same checks, everywhere.

Schema version 1::

    schema_version  1
    model           {name: str, checkpoint: str or null, num_params: int >= 0, architecture, denoiser,
                     label: its name in figures (--label, or architecture and training task)}
    dataset         {name: str ('' for an image folder), split: str, num_images: int > 0, img_size: int > 0,
                     skipped_images: optional [{path, error}], the files --skip-bad-images left out}
    accuracy        {sigma: top-1 %}                        sigma: a 0-255 level as a string, e.g. "25"
    ece             {sigma: %}
    noisy_psnr      {sigma > 0: dB or "n/a"}
    psnr, ssim      {blind, cond_true, cond_pred: {sigma > 0: dB (SSIM in [-1, 1]) or "n/a"}}
    cond_gain_db    {true, pred: {sigma > 0: dB or "n/a"}}
    ood             optional: {auroc: {score: [0, 1] or "n/a"}, ...}
    robustness      optional: {accuracy: {model: {attack: {sigma: {epsilon: %}}}}, ...}
    certify         optional: randomized smoothing (``_validate_certify``)
    eigen           optional: {top, bottom: lists of numbers, ...}

"n/a" (``NA``) marks a measurement that does not apply (a conditional PSNR without labels, any PSNR
of a plain classifier).
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Sequence, Union

from .robustness import ATTACKS, CERTIFY_MODES, level_key

__all__ = ['SCHEMA_VERSION', 'NA', 'REQUIRED', 'CARD_REQUIRED', 'is_number', 'validate_results', 'load_results']

SCHEMA_VERSION = 1
NA = 'n/a'

# What the evaluation writes, every time; a card needs less.
REQUIRED = (
    'schema_version', 'model.name', 'model.checkpoint', 'model.num_params',
    'dataset.name', 'dataset.split', 'dataset.num_images', 'dataset.img_size',
    'accuracy', 'ece', 'noisy_psnr', 'psnr.blind', 'psnr.cond_true', 'psnr.cond_pred',
    'ssim.blind', 'ssim.cond_true', 'ssim.cond_pred', 'cond_gain_db.true', 'cond_gain_db.pred',
)
CARD_REQUIRED = ('schema_version', 'model.name', 'dataset.name', 'dataset.split', 'dataset.num_images',
                 'accuracy', 'psnr.blind')

# The sigma maps: (dotted key, lowest and highest value, "n/a" allowed, noise level 0 allowed).
# A PSNR (and what derives from it) is undefined at sigma 0: there is nothing to denoise.
_SIGMA_MAPS = (
    ('accuracy', 0., 100., False, True),
    ('ece', 0., 100., False, True),
    ('noisy_psnr', -math.inf, math.inf, True, False),
    ('psnr.blind', -math.inf, math.inf, True, False),
    ('psnr.cond_true', -math.inf, math.inf, True, False),
    ('psnr.cond_pred', -math.inf, math.inf, True, False),
    ('ssim.blind', -1., 1., True, False),
    ('ssim.cond_true', -1., 1., True, False),
    ('ssim.cond_pred', -1., 1., True, False),
    ('cond_gain_db.true', -math.inf, math.inf, True, False),
    ('cond_gain_db.pred', -math.inf, math.inf, True, False),
)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): what results.json holds where it holds a measurement."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fail(message: str) -> None:
    raise ValueError(f'results.json: {message}')


def _lookup(results: Dict[str, Any], dotted: str, required: bool) -> Any:
    # Name the first missing level: 'psnr' when there is no psnr at all, 'psnr.blind' when only that is.
    node: Any = results
    parts = dotted.split('.')
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            _fail(f"'{'.'.join(parts[:i])}' must be an object, got {node!r}")
        if part not in node:
            if required:
                _fail(f"missing key '{'.'.join(parts[:i + 1])}'")
            return None
        node = node[part]
    return node


def _check_levels(keys: Iterable[Any], where: str, allow_zero: bool = True) -> None:
    """Noise levels as results.json writes them: 0-255 units, canonical strings ('25', '12.5')."""
    for key in keys:
        try:
            value = float(key)
            ok = isinstance(key, str) and math.isfinite(value) and value >= 0 and level_key(value) == key
        except (TypeError, ValueError):
            ok = False
        if not ok:
            _fail(f"key {key!r} of '{where}' is not a noise level in 0-255 units "
                  f"(expected a string such as '0' or '25')")
        if value == 0 and not allow_zero:
            _fail(f"'{where}' has noise level 0, where a PSNR is undefined")


def _check_sigma_map(table: Any, where: str, lo: float, hi: float, allow_na: bool, allow_zero: bool) -> None:
    if not isinstance(table, dict):
        _fail(f"'{where}' must be an object mapping noise levels (0-255, as strings) to values, got {table!r}")
    _check_levels(table, where, allow_zero)
    for key, value in table.items():
        if allow_na and value == NA:
            continue
        if not is_number(value):
            _fail(f"'{where}.{key}' must be a finite number" + (f' or {NA!r}' if allow_na else '') + f', got {value!r}')
        if not lo <= value <= hi:
            unit = 'top-1 in percent (0-100)' if where == 'accuracy' else f'a number in [{lo:g}, {hi:g}]'
            _fail(f"'{where}.{key}' = {value!r}: expected {unit}")


def _check_positive_int(value: Any, where: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(f"'{where}' must be an integer >= {minimum}, got {value!r}")


def validate_results(
        results: Any,
        *,
        required: Sequence[str] = REQUIRED,
        measured: Sequence[str] = (),
) -> Dict[str, Any]:
    """Check a results dictionary against schema version 1; raise ValueError naming the first problem.

    Every key present is checked (module docstring); ``required`` says which must be present.

    Args:
        results: The parsed ``results.json``.
        required: Dotted keys that must be present (default: all that the evaluation writes;
            ``CARD_REQUIRED``: what a model card uses).
        measured: Sigma maps that must hold at least one number (not only "n/a").

    Returns:
        The same dict.

    Raises:
        ValueError: 'results.json: ...', naming the key and what was expected.
    """
    if not isinstance(results, dict):
        raise ValueError(f'results.json: expected a JSON object, got {type(results).__name__}')
    for dotted in required:
        _lookup(results, dotted, required=True)
    version = results.get('schema_version')
    if version != SCHEMA_VERSION:
        _fail(f"'schema_version' {version!r} is not supported (expected {SCHEMA_VERSION})")
    for dotted in ('model.name', 'dataset.name', 'dataset.split'):
        value = _lookup(results, dotted, required=False)
        # dataset.name is '' for an image folder (timm's convention); the others must say something.
        if value is not None and (not isinstance(value, str) or (not value and dotted != 'dataset.name')):
            _fail(f"'{dotted}' must be a non-empty string, got {value!r}")
    model = results.get('model')
    if isinstance(model, dict) and 'checkpoint' in model and not (
            model['checkpoint'] is None or isinstance(model['checkpoint'], str)):
        _fail(f"'model.checkpoint' must be a string or null, got {model['checkpoint']!r}")
    for dotted, minimum in (('model.num_params', 0), ('dataset.num_images', 1), ('dataset.img_size', 1)):
        value = _lookup(results, dotted, required=False)
        if value is not None:
            _check_positive_int(value, dotted, minimum)
    for dotted, lo, hi, allow_na, allow_zero in _SIGMA_MAPS:
        table = _lookup(results, dotted, required=False)
        if table is not None:
            _check_sigma_map(table, dotted, lo, hi, allow_na, allow_zero)
    for dotted in measured:
        table = _lookup(results, dotted, required=True)
        if not any(is_number(v) for v in table.values()):
            _fail(f"'{dotted}' has no measured value (none, or all {NA!r})")
    if 'ood' in results:
        auroc = results['ood'].get('auroc') if isinstance(results['ood'], dict) else None
        if not isinstance(auroc, dict) or not auroc:
            _fail("'ood.auroc' must be an object of scores")
        for key, value in auroc.items():
            if value != NA and not (is_number(value) and 0 <= value <= 1):
                _fail(f"'ood.auroc.{key}' = {value!r}: expected a number in [0, 1] or {NA!r}")
    if 'robustness' in results:
        _validate_robustness(results['robustness'])
    if 'certify' in results:
        _validate_certify(results['certify'])
    if 'eigen' in results:
        e = results['eigen']
        if not isinstance(e, dict) or not all(isinstance(e.get(k), list) and all(is_number(v) for v in e[k])
                                              for k in ('top', 'bottom')):
            _fail("'eigen.top' and 'eigen.bottom' must be lists of numbers")
    return results


def _validate_robustness(r: Any) -> None:
    """``robustness.accuracy``: {model: {attack in linf, l2: {sigma: {epsilon: % in [0, 100]}}}}."""
    acc = r.get('accuracy') if isinstance(r, dict) else None
    if not isinstance(acc, dict) or not acc:
        _fail("'robustness.accuracy' must map model names to attack grids")
    for name, grid in acc.items():
        if not isinstance(grid, dict) or not grid:
            _fail(f'robustness.accuracy[{name!r}] must map attacks to grids')
        for attack, per_sigma in grid.items():
            if attack not in ATTACKS:
                _fail(f'robustness.accuracy[{name!r}] has attack {attack!r}; expected {ATTACKS}')
            if not isinstance(per_sigma, dict):
                _fail(f'robustness.accuracy[{name!r}][{attack!r}] must map sigmas to cells')
            _check_levels(per_sigma, f'robustness sigma of {name!r}')
            for sigma, cells in per_sigma.items():
                if not isinstance(cells, dict) or not cells or not all(is_number(v) and 0 <= v <= 100
                                                                       for v in cells.values()):
                    _fail(f'robustness.accuracy[{name!r}][{attack!r}][{sigma!r}] must map epsilons to % in [0, 100]')


def _validate_certify(c: Any) -> None:
    """``certify``: settings n0, n (int >= 1), alpha in (0, 1), num_images; ``sigmas`` (0-255 keys) and
    ``radii`` (L2, [0, 1] pixels); ``index`` and ``label`` [num_images]; ``max_radius`` {sigma: >= 0};
    ``models`` {name: {mode in CERTIFY_MODES: {sigma: {accuracy: {radius: %}, abstain: %, curve: {radius,
    accuracy}, prediction: [num_images] ints >= -1, radius: [num_images] >= 0}}}}."""
    if not isinstance(c, dict):
        _fail('certify must be an object')
    for key in ('n0', 'n', 'num_images'):
        _check_positive_int(c.get(key), f'certify.{key}')
    if not (is_number(c.get('alpha')) and 0 < c['alpha'] < 1):
        _fail(f'certify.alpha must be in (0, 1), got {c.get("alpha")!r}')
    n_img = c['num_images']
    for key in ('sigmas', 'radii'):
        if not isinstance(c.get(key), list) or not c[key]:
            _fail(f'certify.{key} must be a non-empty list')
    _check_levels(c['sigmas'], 'certify.sigmas')
    _check_sigma_map(c.get('max_radius'), 'certify.max_radius', 0, math.inf, allow_na=False, allow_zero=True)
    for key in ('index', 'label'):
        v = c.get(key)
        if not isinstance(v, list) or len(v) != n_img or not all(isinstance(i, int) and i >= 0 for i in v):
            _fail(f'certify.{key} must be a list of {n_img} non-negative integers')
    models = c.get('models')
    if not isinstance(models, dict) or not models:
        _fail('certify.models must map model names to base classifiers')
    for name, per_mode in models.items():
        if not isinstance(per_mode, dict) or not per_mode or not set(per_mode) <= set(CERTIFY_MODES):
            _fail(f'certify.models[{name!r}] must map base classifiers {CERTIFY_MODES} to sigmas')
        for mode, per_sigma in per_mode.items():
            where = f'certify.models[{name!r}][{mode!r}]'
            if not isinstance(per_sigma, dict) or set(per_sigma) != set(c['sigmas']):
                _fail(f'{where} must have one cell per sigma {c["sigmas"]}')
            for sigma, cell in per_sigma.items():
                _validate_certify_cell(cell, f'{where}[{sigma!r}]', c['radii'], n_img)


def _validate_certify_cell(cell: Any, w: str, radii: Sequence[str], n_img: int) -> None:
    if not isinstance(cell, dict):
        _fail(f'{w} must be an object')
    acc = cell.get('accuracy')
    if not isinstance(acc, dict) or set(acc) != set(radii) or not all(is_number(v) and 0 <= v <= 100
                                                                      for v in acc.values()):
        _fail(f'{w}.accuracy must map the radii {radii} to % in [0, 100]')
    if not (is_number(cell.get('abstain')) and 0 <= cell['abstain'] <= 100):
        _fail(f'{w}.abstain must be a % in [0, 100]')
    pred, rad = cell.get('prediction'), cell.get('radius')
    if (not isinstance(pred, list) or len(pred) != n_img
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= -1 for p in pred)):
        _fail(f'{w}.prediction must be {n_img} class indices (-1: abstain)')
    if not isinstance(rad, list) or len(rad) != n_img or not all(is_number(r) and r >= 0 for r in rad):
        _fail(f'{w}.radius must be {n_img} radii >= 0')
    curve = cell.get('curve')
    if (not isinstance(curve, dict) or not isinstance(curve.get('radius'), list)
            or not isinstance(curve.get('accuracy'), list) or len(curve['radius']) != len(curve['accuracy'])
            or not all(is_number(v) for v in curve['radius'] + curve['accuracy'])):
        _fail(f'{w}.curve must hold two lists of numbers of equal length, radius and accuracy')


def load_results(path: Union[str, Path], **kwargs) -> Dict[str, Any]:
    """Read and validate a ``results.json`` written by ``python -m timm_joint.evaluate``.

    Args:
        path: The file.
        **kwargs: ``required`` / ``measured`` of ``validate_results``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not valid results.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f'results file {str(path)!r} is a folder: expected the results.json that python -m '
                         f'timm_joint.evaluate wrote (e.g. {path / "results.json"})')
    if not path.is_file():
        raise FileNotFoundError(f'results file {path} does not exist (write it with python -m timm_joint.evaluate)')
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'results file {str(path)!r} is not valid JSON ({e}): expected the results.json that '
                         f'python -m timm_joint.evaluate wrote') from None
    return validate_results(results, **kwargs)
