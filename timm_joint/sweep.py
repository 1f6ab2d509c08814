"""Train several variants at an equal budget with ``timm_joint.train`` and print one comparison table.

    python -m timm_joint.sweep --preset design  --steps 300     # DESIGN §3 design choices
    python -m timm_joint.sweep --preset tasks   --steps 300     # classification-only, denoising-only, joint
    python -m timm_joint.sweep --preset tasks --dataset digits  # the same on scikit-learn's digits
    python -m timm_joint.sweep --preset table1 --evaluate       # the paper's Table 1, small scale
    python -m timm_joint.sweep --preset certify --evaluate      # certified accuracy, randomized smoothing

Every variant is one training run (``python -m timm_joint.train``, a fresh process) per seed (``--seeds``, 42 by default)
from the same base config and the same number of optimizer steps, so the classification and denoising
loaders see the same images per task; with several seeds the table shows the mean ± the standard
deviation over seeds (runs of one seed differ by several points of top-1 at this scale); wall time is
reported beside the metrics. Results go to ``runs/sweeps/NAME/PRESET.json``
and a Markdown table (``PRESET.md``) printed at the end; presets may share a folder and its runs.
Finished variants are reused on a re-run (their summary is read back), and an interrupted run resumes
from its checkpoint, so a sweep can be stopped and started again. Paths (the config, data folders,
``--output``) are relative to the current folder, as for every other command; a config that is not there
is read from the packaged recipes (``configs/``).
"""
import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .cli import check_out_dir, program_name, run_or_exit
from .io import atomic_write
from .results import NA, load_results

__all__ = ['PRESETS', 'PRESET_EVAL_ARGS', 'run_sweep', 'render_table']

# Each preset: (variant name, extra training arguments). Presets may share a sweep folder: a
# variant name always means the same arguments, so a run made for one preset is reused by the others.
_RESNET18 = ('timm resnet18, classification', ['--task', 'classification', '--model', 'resnet18'])
_CLS = ('classification only', ['--task', 'classification'])
_DEN = ('denoising only', ['--task', 'denoising'])
_JOINT = ('joint', ['--task', 'joint'])
PRESETS: Dict[str, List[Tuple[str, List[str]]]] = {
    'tasks': [_CLS, _DEN, _JOINT, _RESNET18],
    # The paper's Table 1 at small scale: the tasks above plus dedicated denoisers (deepinv's
    # architectures, trained here), narrowed to about the tiny GradResNet's cost so they train in minutes
    # on a CPU (the full DnCNN took about 7 s per step of 64 images here).
    'table1': [
        _RESNET18, _CLS,
        ('DnCNN (depth 6, width 16), denoising only', ['--task', 'denoising', '--model', 'dncnn_deepinv',
                                                       '--model-kwargs', 'depth=6', 'width=16']),
        ('DRUNet (width 8, 1 block), denoising only', ['--task', 'denoising', '--model', 'drunet_deepinv',
                                                       '--model-kwargs', 'width=8', 'num_blocks=1']),
        _DEN, _JOINT,
    ],
    # The loss: the default (a constant weight 100) against the paper's unweighted sum (both readings of its
    # mean-squared error), other constant weights, the ramp of earlier versions, and the pooled energy.
    'loss': [
        _JOINT,
        ('unweighted, per-pixel mean', ['--lambda-den-start', 'none', '--lambda-den', '1']),
        ('unweighted, per-image sum', ['--lambda-den-start', 'none', '--lambda-den', '1', '--den-reduction', 'sum']),
        ('lambda 30, constant', ['--lambda-den-start', 'none', '--lambda-den', '30']),
        ('lambda 300, constant', ['--lambda-den-start', 'none', '--lambda-den', '300']),
        ('lambda 10 -> 200', ['--lambda-den-start', '10', '--lambda-den', '200']),
        ('energy pooled', ['--model-kwargs', 'energy_form=pooled']),
    ],
    # DESIGN §3: the noise ranges and the norm's group size.
    'design': [
        _JOINT,
        ('sigma_max_cls 25', ['--sigma-max-cls', '25']),
        ('sigma_max_den 200', ['--sigma-max-den', '200']),
        ('group size 16', ['--model-kwargs', 'group_size=16']),
        ('norm after every conv', ['--model-kwargs', 'norm_position=conv']),
    ],
    # Certified robustness by randomized smoothing (issue 16): the joint model (its own noisy classifier and
    # denoised smoothing), classification only, and timm's resnet18 trained on clean images and with Gaussian
    # noise at the certification sigma, 25 (Cohen et al.'s baseline). Needs --evaluate (PRESET_EVAL_ARGS).
    'certify': [
        _JOINT, _CLS,
        ('timm resnet18, clean', ['--task', 'classification', '--model', 'resnet18',
                                  '--sigma-dist-cls', 'fixed', '--sigma-max-cls', '0']),
        ('timm resnet18, noise 25 (Cohen et al.)', ['--task', 'classification', '--model', 'resnet18',
                                                    '--sigma-dist-cls', 'fixed', '--sigma-max-cls', '25']),
    ],
    # The paper's ablations (Table 3), each one flag away from the default, and the parts of the network
    # of earlier versions (a plain GroupNorm, the norm before the block's GELU, an energy head apart from the
    # classifier), alone and together.
    'ablations': [
        _JOINT,
        ('biases', ['--model-kwargs', 'bias=True']),
        ('ReLU', ['--model-kwargs', 'act_layer=relu']),
        ('BatchNorm', ['--model-kwargs', 'norm_layer=batchnorm', 'norm_position=conv']),
        ('no side connections', ['--model-kwargs', 'side_connections=False']),
        ('plain GroupNorm', ['--model-kwargs', 'norm_layer=groupnorm']),
        ('norm before the GELU', ['--model-kwargs', 'norm_position=end']),
        ('separate heads', ['--model-kwargs', 'heads=separate']),
        ('earlier network', ['--model-kwargs', 'norm_layer=groupnorm', 'norm_position=end', 'bias=True',
                             'heads=separate']),
        ('texture levers', ['--model-kwargs', 'act_gain=10', 'stem_centring=True']),
    ],
    # The texture task (--dataset textures): per-image statistics against BatchNorm's batch statistics,
    # and the two levers that let the per-image network measure a texture's spectrum.
    'textures': [
        _CLS, _JOINT,
        ('classification only, BatchNorm', ['--task', 'classification', '--model-kwargs', 'norm_layer=batchnorm',
                                            'norm_position=conv']),
        ('joint, BatchNorm', ['--model-kwargs', 'norm_layer=batchnorm', 'norm_position=conv']),
        ('classification only, texture levers', ['--task', 'classification', '--model-kwargs', 'act_gain=10',
                                                 'stem_centring=True']),
        ('joint, texture levers', ['--model-kwargs', 'act_gain=10', 'stem_centring=True']),
    ],
    # Mohan et al.'s reason to remove biases: denoising beyond the training range (sigma_max_den 100). Their
    # argument needs a homogeneous network (D(a y) = a D(y)); GELU is not, ReLU is: both, with and without
    # biases.
    'generalization': [
        _DEN,
        ('denoising only, biases', ['--task', 'denoising', '--model-kwargs', 'bias=True']),
        ('denoising only, ReLU', ['--task', 'denoising', '--model-kwargs', 'act_layer=relu']),
        ('denoising only, ReLU, biases', ['--task', 'denoising', '--model-kwargs', 'act_layer=relu', 'bias=True']),
    ],
}

DATASETS = {
    'quickstart': ('data/quickstart', 'quickstart'),
    'digits': ('data/digits', 'digits'),
    'textures': ('data/textures', 'textures'),
}

COLUMNS = ('top1_s0', 'top1_s25', 'psnr_s15', 'psnr_s25', 'psnr_s50')

# Arguments a preset adds to every ``python -m timm_joint.evaluate`` call (``--eval-args`` adds more: later
# flags win), and the columns of its table. Certification at n = 10,000 and alpha = 0.001 reaches radius
# 0.31 at sigma 25 (n = 1,000 stops at 0.24, short of the 0.25 the issue compares at).
PRESET_EVAL_ARGS: Dict[str, List[str]] = {
    'generalization': ['--psnr-sigmas', '15', '25', '50', '100', '150', '200'],
    'certify': ['--certify', '--certify-sigmas', '25', '--certify-n', '10000', '--certify-n0', '100',
                '--certify-alpha', '0.001', '--certify-images', '100', '--certify-mode', 'both'],
}
PRESET_COLUMNS: Dict[str, Tuple[str, ...]] = {
    'generalization': ('psnr_s25', 'psnr_s50', 'psnr_s100', 'psnr_s150', 'psnr_s200'),
    # r = 0.5 is out of reach at sigma 25 with n = 10,000 (the largest certifiable radius is 0.31).
    'certify': ('top1_s0', 'top1_s25', 'cert_own_s25_r0', 'cert_own_s25_r0.25', 'cert_denoised_s25_r0',
                'cert_denoised_s25_r0.25'),
}

def _header(key: str) -> str:
    """'cert_own_s25_r0.25' -> 'own, σ=25, r=0.25' (certified top-1), 'psnr_s150' -> 'PSNR σ=150',
    'top1_s50' -> 'top-1 σ=50'."""
    if key.startswith('cert_'):
        mode, sigma, radius = key[len('cert_'):].rsplit('_', 2)
        return f'{mode}, σ={sigma[1:]}, r={radius[1:]}'
    for prefix, label in (('psnr_s', 'PSNR'), ('top1_s', 'top-1')):
        if key.startswith(prefix):
            return f'{label} σ={key[len(prefix):]}'
    return key


def _read_summary(run_dir: Path) -> Optional[Dict[str, float]]:
    path = run_dir / 'summary.csv'
    if not path.is_file():
        return None
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None
    last = rows[-1]
    return {k[len('eval_'):]: float(v) for k, v in last.items() if k.startswith('eval_') and v != ''}


def _prepare(kind: str, data_dir: str) -> None:
    subprocess.run([sys.executable, '-m', 'timm_joint.data', kind, '--root', data_dir], check=True)


def _evaluate(run_dir: Path, data_dir: str, task: str, eval_args: Sequence[str] = ()) -> Dict[str, float]:
    """Evaluate the run's last export with ``python -m timm_joint.evaluate`` (the same command for all).

    Extra ``eval_args`` get a results folder of their own (named by their hash), so a sweep re-run with
    other evaluation settings never reads back results measured with different ones.
    """
    tag = hashlib.sha1(' '.join(eval_args).encode()).hexdigest()[:8] if eval_args else ''
    out = run_dir / (f'eval-{tag}' if tag else 'eval')
    if not (out / 'results.json').is_file():
        cmd = [sys.executable, '-m', 'timm_joint.evaluate', '--model', f'local-dir:{run_dir / "export" / "last"}',
               '--dataset', '', '--data-dir', data_dir, '--psnr-sigmas', '15', '25', '50',
               '--eigen-k', '0', '--grid-images', '2', '--workers', '0', '--no-progress', '--out', str(out)]
        args_file = run_dir / 'args.yaml'
        if args_file.is_file():  # evaluate at the training size, whatever the export's config says
            import yaml
            img_size = (yaml.safe_load(args_file.read_text()) or {}).get('img_size')
            if img_size:
                cmd += ['--img-size', str(img_size)]
        cmd += ['--sigmas', '0', '25'] if task != 'denoising' else ['--sigmas']
        cmd += list(eval_args)
        subprocess.run(cmd, check=True)
    res = load_results(out / 'results.json')
    metrics = {}
    for s, v in (res.get('accuracy') or {}).items():
        if isinstance(v, (int, float)):
            metrics[f'top1_s{float(s):g}'] = float(v)
    for s, v in ((res.get('psnr') or {}).get('blind') or {}).items():
        if isinstance(v, (int, float)):
            metrics[f'psnr_s{float(s):g}'] = float(v)
    certify = res.get('certify') or {}
    name = res.get('model', {}).get('name')
    for mode, per_sigma in (certify.get('models', {}).get(name) or {}).items():
        for s, cell in per_sigma.items():
            for r, v in cell['accuracy'].items():
                metrics[f'cert_{mode}_s{s}_r{r}'] = float(v)
    return metrics


def _read_config(config: str) -> Dict:
    """The base config's values (a local file, or the recipe packaged under that name)."""
    import yaml
    from .resources import find_config
    config_file = find_config(config)
    if config_file is None:
        raise ValueError(f'config file {config!r} not found')
    return yaml.safe_load(config_file.read_text()) or {}


def _epochs_for(steps: int, config: str, data_dir: str, args: Sequence[str]) -> int:
    """Epochs whose learning-rate schedule ends at ``steps`` (one epoch = len(train set) // batch)."""
    import math
    cfg = _read_config(config)
    batch = int(cfg.get('batch_size', 128))
    task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--task'), cfg.get('task', 'joint'))
    if task == 'denoising':
        batch = int(cfg.get('den_batch_size') or batch)
    n_train = sum(1 for p in Path(data_dir).joinpath('train').rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
    per_epoch = max(1, n_train // batch) if n_train else steps
    return max(1, math.ceil(steps / per_epoch))


def _run_variant(name, args, run_dir, config, data_dir, steps, extra, evaluate, eval_args=()) -> Dict[str, float]:
    """Train one variant at one seed (or read a finished run back); return its metrics and wall time."""
    timing = run_dir / 'wall_time.json'
    if _read_summary(run_dir) is None or not timing.is_file():
        # The package's own entry point: an installed package has no train_joint.py.
        cmd = [sys.executable, '-m', 'timm_joint.train', '-c', config, '--data-dir', data_dir,
               '--max-steps', str(steps), '--epochs', str(_epochs_for(steps, config, data_dir, args)),
               '--eval-interval', '1000000', '--no-progress',
               '--output', str(run_dir.parent), '--experiment', run_dir.name, *args, *extra]
        print(f'[sweep] {name}: {" ".join(cmd[1:])}', flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
            'OMP_NUM_THREADS', str(os.cpu_count() or 1))))
        atomic_write(timing, json.dumps({'wall_s': time.time() - t0}))
    metrics = _read_summary(run_dir) or {}
    if evaluate:
        task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--task'), 'joint')
        metrics = _evaluate(run_dir, data_dir, task, eval_args)
    return {**metrics, 'wall_s': json.loads(timing.read_text())['wall_s']}


def _aggregate(name, args, steps, seeds, runs) -> Dict:
    """One record: the mean over seeds of every metric, and its sample standard deviation."""
    import statistics
    record = {'variant': name, 'args': args, 'steps': steps, 'seeds': list(seeds)}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        record[key] = statistics.fmean(values)
        if len(values) > 1 and key != 'wall_s':
            record[f'{key}_std'] = statistics.stdev(values)
    if len(runs) > 1:
        record['per_seed'] = [dict(r, seed=s) for s, r in zip(seeds, runs)]
    return record


def _cls_noise(args: Sequence[str], config: str) -> str:
    """The classification training noise of a variant, in words: 'u² · 50', 'fixed 25' or 'clean'."""
    cfg = _read_config(config)

    def arg(flag: str, default):
        values = [args[i + 1] for i in range(len(args) - 1) if args[i] == flag]
        return values[-1] if values else default   # the last one wins, as in argparse

    dist = arg('--sigma-dist-cls', cfg.get('sigma_dist_cls', 'squared_uniform'))
    top = float(arg('--sigma-max-cls', cfg.get('sigma_max_cls', 50.)))
    if dist == 'fixed':
        return 'clean' if top == 0 else f'fixed {top:g}'
    return f'u² · {top:g}'


def run_sweep(
        preset: str,
        *,
        config: str,
        dataset: str,
        steps: int,
        out: Path,
        extra: Sequence[str] = (),
        variants: Optional[Sequence[str]] = None,
        evaluate: bool = False,
        seeds: Sequence[int] = (42,),
        eval_args: Sequence[str] = (),
) -> List[Dict]:
    """Run (or reuse) every variant of a preset once per seed; return one record per variant.

    Metrics come from the run's final validation (summary.csv) or, with ``evaluate``, from
    ``python -m timm_joint.evaluate`` on its export, called with the preset's ``PRESET_EVAL_ARGS`` and then
    ``eval_args``. With several seeds a record holds the mean of each metric, its sample standard deviation
    (``KEY_std``) and the per-seed values (``per_seed``).
    """
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f'seeds must be distinct non-negative integers, got {list(seeds)}')
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
    if preset in PRESET_EVAL_ARGS and not evaluate:
        raise ValueError(f'preset {preset!r} is measured by python -m timm_joint.evaluate: '
                         f'pass evaluate=True (--evaluate)')
    eval_args = [*PRESET_EVAL_ARGS.get(preset, []), *eval_args]
    data_dir, prepare = DATASETS[dataset]
    _prepare(prepare, data_dir)
    records = []
    for name, args in PRESETS[preset]:
        if variants and name not in variants:
            continue
        runs = []
        for seed in seeds:
            slug = f"{name.replace(' ', '_').replace('/', '_')}_seed{seed}"
            runs.append(_run_variant(name, [*args, '--seed', str(seed)], out / slug, config, data_dir, steps,
                                     extra, evaluate, eval_args))
        records.append(_aggregate(name, args, steps, seeds, runs))
        records[-1]['cls_noise'] = _cls_noise([*args, *extra], config)
        columns = PRESET_COLUMNS.get(preset, COLUMNS)
        print(f'[sweep] {name}: ' + ' '.join(f'{k} {records[-1][k]:.2f}' for k in columns if k in records[-1]),
              flush=True)
    return records


def render_table(records: Sequence[Dict], columns: Sequence[str] = COLUMNS) -> str:
    """Markdown table: top-1 (%) at sigma 0 and 25, blind PSNR (dB) at 15/25/50, wall time (per run).

    With several seeds each cell is the mean ± the sample standard deviation over seeds. ``columns``
    chooses other metrics (``PRESET_COLUMNS``: certified top-1 'cert_MODE_sSIGMA_rRADIUS', in %); a
    table with certified columns also names each variant's classification training noise.
    """
    noise = any(k.startswith('cert_') for k in columns)
    head = ('| variant | ' + ('cls noise | ' if noise else '') + ' | '.join(_header(k) for k in columns)
            + ' | wall (s) |')
    lines = [head, '|' + '---|' * (len(columns) + 2 + noise)]
    for r in records:
        cells = [r.get('cls_noise', '')] if noise else []
        for k in columns:
            digits = 1 if k.startswith(('top1', 'cert_')) else 2
            cell = f'{r[k]:.{digits}f}' if k in r else NA
            if f'{k}_std' in r:
                cell += f' ± {r[f"{k}_std"]:.{digits}f}'
            cells.append(cell)
        lines.append(f"| {r['variant']} | " + ' | '.join(cells) + f" | {r['wall_s']:.0f} |")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=program_name('timm_joint.sweep'),
                                     description='Equal-budget comparisons with timm_joint.train')
    parser.add_argument('--preset', default='tasks', choices=sorted(PRESETS))
    parser.add_argument('--dataset', default='quickstart', choices=sorted(DATASETS))
    parser.add_argument('-c', '--config', default='configs/quickstart.yaml')
    parser.add_argument('--steps', type=int, default=300, help='optimizer steps per variant')
    parser.add_argument('--name', default=None, help='sweep folder name (default: PRESET-DATASET-STEPS)')
    parser.add_argument('--output', default='runs/sweeps')
    parser.add_argument('--variants', nargs='*', default=None, help='only these variants (names as in the table)')
    parser.add_argument('--evaluate', action='store_true',
                        help='measure each export with python -m timm_joint.evaluate (default: the run\'s validation)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[42],
                        help='train every variant once per seed; the table shows mean ± std over seeds')
    parser.add_argument('--eval-args', default='',
                        help='further python -m timm_joint.evaluate arguments, one quoted string after = '
                             '(--eval-args="--certify-n 2000 --certify-images 50"); they get a results folder '
                             'of their own')
    parser.add_argument('extra', nargs='*', help='further training arguments for every variant (after --)')
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error('--steps must be positive')
    if any(a == '--seed' or a.startswith('--seed=') for a in args.extra):
        parser.error('give seeds with --seeds, not --seed after --: every run of a variant would share it')
    out = Path(args.output) / (args.name or f'{args.preset}-{args.dataset}-{args.steps}')
    def check_paths() -> None:
        check_out_dir(args.output, '--output')
        check_out_dir(out, '--name')

    run_or_exit('timm_joint.sweep', check_paths)
    out.mkdir(parents=True, exist_ok=True)
    if args.preset in PRESET_EVAL_ARGS and not args.evaluate:
        parser.error(f'--preset {args.preset} is measured by python -m timm_joint.evaluate: add --evaluate')
    def sweep() -> List[Dict[str, Any]]:
        try:
            return run_sweep(args.preset, config=args.config, dataset=args.dataset, steps=args.steps, out=out,
                             extra=args.extra, variants=args.variants, evaluate=args.evaluate, seeds=args.seeds,
                             eval_args=shlex.split(args.eval_args))
        except subprocess.CalledProcessError as e:  # the run's own error is above; finished runs are kept
            raise ValueError(f'a run failed (exit status {e.returncode}): {" ".join(map(str, e.cmd[1:]))}; '
                             f'finished runs are kept and reused when the sweep is run again') from None

    records = run_or_exit('timm_joint.sweep', sweep)
    table = render_table(records, PRESET_COLUMNS.get(args.preset, COLUMNS))
    atomic_write(out / f'{args.preset}.json', json.dumps({
        'schema_version': 1, 'preset': args.preset, 'dataset': args.dataset, 'steps': args.steps,
        'seeds': args.seeds, 'eval_args': args.eval_args, 'config': args.config, 'records': records}, indent=2))
    atomic_write(out / f'{args.preset}.md', table + '\n')
    print(table)


if __name__ == '__main__':
    main()
