"""Train several variants at an equal budget with ``timm_joint.train`` and print one comparison table.

    python -m timm_joint.sweep --preset design  --steps 300     # DESIGN §3 design choices
    python -m timm_joint.sweep --preset tasks   --steps 300     # classification-only, denoising-only, joint
    python -m timm_joint.sweep --preset tasks --dataset digits  # the same on scikit-learn's digits
    python -m timm_joint.sweep --preset table1 --evaluate       # the paper's Table 1, small scale

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
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['PRESETS', 'run_sweep', 'render_table']

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
    # DESIGN §3: the weight of the denoising term and its schedule, the noise ranges, the norm placement.
    'design': [
        _JOINT, _RESNET18,
        ('lambda 10, constant', ['--lambda-den-start', '10', '--lambda-den', '10']),
        ('lambda 100, constant', ['--lambda-den-start', '100', '--lambda-den', '100']),
        ('lambda 10 -> 100', ['--lambda-den-start', '10', '--lambda-den', '100']),
        ('lambda 10 -> 1000', ['--lambda-den-start', '10', '--lambda-den', '1000']),
        ('norm after every conv', ['--model-kwargs', 'norm_position=conv']),
        ('sigma_max_cls 25', ['--sigma-max-cls', '25']),
        ('sigma_max_den 200', ['--sigma-max-den', '200']),
    ],
    # The paper's ablations (Table 3), each one flag away from the default.
    'ablations': [
        _JOINT,
        ('bias-free', ['--model-kwargs', 'bias=False']),
        ('bias-free, norm shifts kept', ['--model-kwargs', 'bias=False', 'norm_bias=True']),
        ('ReLU', ['--model-kwargs', 'act_layer=relu']),
        ('BatchNorm', ['--model-kwargs', 'norm_layer=batchnorm', 'norm_position=conv']),
        ('no side connections', ['--model-kwargs', 'side_energy=False']),
    ],
}

DATASETS = {
    'quickstart': ('data/quickstart', 'quickstart'),
    'digits': ('data/digits', 'digits'),
    'textures': ('data/textures', 'textures'),
}

COLUMNS = ('top1_s0', 'top1_s25', 'psnr_s15', 'psnr_s25', 'psnr_s50')


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


def _evaluate(run_dir: Path, data_dir: str, task: str) -> Dict[str, float]:
    """Evaluate the run's last export with ``python -m timm_joint.evaluate`` (the same command for all)."""
    out = run_dir / 'eval'
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
        subprocess.run(cmd, check=True)
    res = json.loads((out / 'results.json').read_text())
    metrics = {}
    for s, v in (res.get('accuracy') or {}).items():
        if isinstance(v, (int, float)):
            metrics[f'top1_s{float(s):g}'] = float(v)
    for s, v in ((res.get('psnr') or {}).get('blind') or {}).items():
        if isinstance(v, (int, float)):
            metrics[f'psnr_s{float(s):g}'] = float(v)
    return metrics


def _epochs_for(steps: int, config: str, data_dir: str, args: Sequence[str]) -> int:
    """Epochs whose learning-rate schedule ends at ``steps`` (one epoch = len(train set) // batch)."""
    import math
    import yaml
    from .resources import find_config
    config_file = find_config(config)
    if config_file is None:
        raise ValueError(f'config file {config!r} not found')
    cfg = yaml.safe_load(config_file.read_text()) or {}
    batch = int(cfg.get('batch_size', 128))
    task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--task'), cfg.get('task', 'joint'))
    if task == 'denoising':
        batch = int(cfg.get('den_batch_size') or batch)
    n_train = sum(1 for p in Path(data_dir).joinpath('train').rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
    per_epoch = max(1, n_train // batch) if n_train else steps
    return max(1, math.ceil(steps / per_epoch))


def _run_variant(name, args, run_dir, config, data_dir, steps, extra, evaluate) -> Dict[str, float]:
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
        timing.write_text(json.dumps({'wall_s': time.time() - t0}))
    metrics = _read_summary(run_dir) or {}
    if evaluate:
        task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--task'), 'joint')
        metrics = _evaluate(run_dir, data_dir, task)
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
) -> List[Dict]:
    """Run (or reuse) every variant of a preset once per seed; return one record per variant.

    Metrics come from the run's final validation (summary.csv) or, with ``evaluate``, from
    ``python -m timm_joint.evaluate`` on its export. With several seeds a record holds the mean of
    each metric, its sample standard deviation (``KEY_std``) and the per-seed values (``per_seed``).
    """
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f'seeds must be distinct non-negative integers, got {list(seeds)}')
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
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
                                     extra, evaluate))
        records.append(_aggregate(name, args, steps, seeds, runs))
        print(f'[sweep] {name}: ' + ' '.join(f'{k} {records[-1][k]:.2f}' for k in COLUMNS if k in records[-1]),
              flush=True)
    return records


def render_table(records: Sequence[Dict]) -> str:
    """Markdown table: top-1 (%) at sigma 0 and 25, blind PSNR (dB) at 15/25/50, wall time (per run).

    With several seeds each cell is the mean ± the sample standard deviation over seeds.
    """
    head = '| variant | top-1 σ=0 | top-1 σ=25 | PSNR σ=15 | PSNR σ=25 | PSNR σ=50 | wall (s) |'
    lines = [head, '|' + '---|' * 7]
    for r in records:
        cells = []
        for k in COLUMNS:
            digits = 1 if k.startswith('top1') else 2
            cell = f'{r[k]:.{digits}f}' if k in r else 'n/a'
            if f'{k}_std' in r:
                cell += f' ± {r[f"{k}_std"]:.{digits}f}'
            cells.append(cell)
        lines.append(f"| {r['variant']} | " + ' | '.join(cells) + f" | {r['wall_s']:.0f} |")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Equal-budget comparisons with timm_joint.train')
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
    parser.add_argument('extra', nargs='*', help='further training arguments for every variant (after --)')
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error('--steps must be positive')
    if any(a == '--seed' or a.startswith('--seed=') for a in args.extra):
        parser.error('give seeds with --seeds, not --seed after --: every run of a variant would share it')
    out = Path(args.output) / (args.name or f'{args.preset}-{args.dataset}-{args.steps}')
    out.mkdir(parents=True, exist_ok=True)
    records = run_sweep(args.preset, config=args.config, dataset=args.dataset, steps=args.steps, out=out,
                        extra=args.extra, variants=args.variants, evaluate=args.evaluate, seeds=args.seeds)
    table = render_table(records)
    (out / f'{args.preset}.json').write_text(json.dumps({'schema_version': 1, 'preset': args.preset,
                                                  'dataset': args.dataset, 'steps': args.steps,
                                                  'seeds': args.seeds,
                                                  'config': args.config, 'records': records}, indent=2))
    (out / f'{args.preset}.md').write_text(table + '\n')
    print(table)


if __name__ == '__main__':
    main()
