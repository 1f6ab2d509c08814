"""Train several variants at an equal budget with ``train_joint.py`` and print one comparison table.

    python -m timm_joint.sweep --preset design  --steps 300     # DESIGN §3 design choices
    python -m timm_joint.sweep --preset tasks   --steps 300     # classification-only, denoising-only, joint
    python -m timm_joint.sweep --preset tasks --dataset digits  # the same on scikit-learn's digits
    python -m timm_joint.sweep --preset table1 --evaluate       # the paper's Table 1, small scale

Every variant is one ``train_joint.py`` run (a fresh process) from the same base config, the same seed
and the same number of optimizer steps, so the classification and denoising loaders see the same images
per task; wall time is reported beside the metrics. Results go to ``runs/sweeps/NAME/PRESET.json``
and a Markdown table (``PRESET.md``) printed at the end; presets may share a folder and its runs.
Finished variants are reused on a re-run (their summary is read back), and an interrupted run resumes
from its checkpoint, so a sweep can be stopped and started again.
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

ROOT = Path(__file__).resolve().parents[1]

# Each preset: (variant name, extra train_joint.py arguments).
PRESETS: Dict[str, List[Tuple[str, List[str]]]] = {
    'tasks': [
        ('classification only', ['--task', 'classification']),
        ('denoising only', ['--task', 'denoising']),
        ('joint', ['--task', 'joint']),
        ('timm resnet18, classification', ['--task', 'classification', '--model', 'resnet18']),
    ],
    # The paper's Table 1 at small scale: the tasks above plus dedicated denoisers (deepinv's
    # architectures, trained here), narrowed to about the tiny GradResNet's cost so they train in minutes
    # on a CPU (the full DnCNN took about 7 s per step of 64 images here).
    'table1': [
        ('timm resnet18, classification', ['--task', 'classification', '--model', 'resnet18']),
        ('GradResNet, classification only', ['--task', 'classification']),
        ('DnCNN (depth 6, width 16), denoising only', ['--task', 'denoising', '--model', 'dncnn_deepinv',
                                                       '--model-kwargs', 'depth=6', 'width=16']),
        ('DRUNet (width 8, 1 block), denoising only', ['--task', 'denoising', '--model', 'drunet_deepinv',
                                                       '--model-kwargs', 'width=8', 'num_blocks=1']),
        ('GradResNet, denoising only', ['--task', 'denoising']),
        ('GradResNet, joint', ['--task', 'joint']),
    ],
    # Pinned to lambda 1 (the default when this table was first measured) so the rows stay comparable.
    'design': [
        ('lambda 1', ['--lambda-den', '1']),
        ('timm resnet18, classification', ['--task', 'classification', '--model', 'resnet18']),
        ('no side connections, lambda 1', ['--lambda-den', '1', '--model-kwargs', 'side_energy=False']),
        ('norm after every conv, lambda 1', ['--lambda-den', '1', '--model-kwargs', 'norm_position=conv']),
        ('lambda 3', ['--lambda-den', '3']),
        ('lambda 10', ['--lambda-den', '10']),
        ('lambda 30', ['--lambda-den', '30']),
        ('sigma_max_cls 25', ['--sigma-max-cls', '25']),
        ('sigma_max_den 200', ['--sigma-max-den', '200']),
    ],
    # The paper's ablations (Table 3): each one flag away from the default.
    'ablations': [
        ('lambda 10', ['--lambda-den', '10']),
        ('ReLU', ['--model-kwargs', 'act_layer=relu']),
        ('BatchNorm', ['--model-kwargs', 'norm_layer=batchnorm', 'norm_position=conv']),
        ('biases', ['--model-kwargs', 'bias=True']),
        ('no side connections', ['--model-kwargs', 'side_energy=False']),
    ],
}
# (The ablation rows run at the default lambda 10; 'lambda 10' is shared with the design preset.)

DATASETS = {
    'quickstart': ('data/quickstart', 'quickstart'),
    'digits': ('data/digits', 'digits'),
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
    subprocess.run([sys.executable, '-m', 'timm_joint.data', kind, '--root', data_dir], check=True, cwd=ROOT)


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
        subprocess.run(cmd, check=True, cwd=ROOT)
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
    cfg = yaml.safe_load(open(ROOT / config if not os.path.isabs(config) else config)) or {}
    batch = int(cfg.get('batch_size', 128))
    task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--task'), cfg.get('task', 'joint'))
    if task == 'denoising':
        batch = int(cfg.get('den_batch_size') or batch)
    n_train = sum(1 for p in Path(data_dir).joinpath('train').rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
    per_epoch = max(1, n_train // batch) if n_train else steps
    return max(1, math.ceil(steps / per_epoch))


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
) -> List[Dict]:
    """Run (or reuse) every variant of a preset; return one record per variant.

    Metrics come from the run's final validation (summary.csv) or, with ``evaluate``, from
    ``python -m timm_joint.evaluate`` on its export.
    """
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
    data_dir, prepare = DATASETS[dataset]
    _prepare(prepare, data_dir)
    records = []
    for name, args in PRESETS[preset]:
        if variants and name not in variants:
            continue
        slug = name.replace(' ', '_').replace('/', '_')
        run_dir = out / slug
        timing = run_dir / 'wall_time.json'
        if _read_summary(run_dir) is None or not timing.is_file():
            cmd = [sys.executable, str(ROOT / 'train_joint.py'), '-c', config, '--data-dir', data_dir,
                   '--max-steps', str(steps), '--epochs', str(_epochs_for(steps, config, data_dir, args)),
                   '--eval-interval', '1000000', '--no-progress',
                   '--output', str(out), '--experiment', slug, *args, *extra]
            print(f'[sweep] {name}: {" ".join(cmd[1:])}', flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
                'OMP_NUM_THREADS', str(os.cpu_count() or 1))))
            timing.write_text(json.dumps({'wall_s': time.time() - t0}))
        metrics = _read_summary(run_dir) or {}
        if evaluate:
            task = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--task'), 'joint')
            metrics = _evaluate(run_dir, data_dir, task)
        wall = json.loads(timing.read_text())['wall_s']
        records.append({'variant': name, 'args': args, 'steps': steps, 'wall_s': wall, **metrics})
        print(f'[sweep] {name}: ' + ' '.join(f'{k} {metrics[k]:.2f}' for k in COLUMNS if k in metrics), flush=True)
    return records


def render_table(records: Sequence[Dict]) -> str:
    """Markdown table: top-1 (%) at sigma 0 and 25, blind PSNR (dB) at 15/25/50, wall time."""
    head = '| variant | top-1 σ=0 | top-1 σ=25 | PSNR σ=15 | PSNR σ=25 | PSNR σ=50 | wall (s) |'
    lines = [head, '|' + '---|' * 7]
    for r in records:
        cells = [f'{r[k]:.1f}' if k.startswith('top1') and k in r else
                 f'{r[k]:.2f}' if k in r else 'n/a' for k in COLUMNS]
        lines.append(f"| {r['variant']} | " + ' | '.join(cells) + f" | {r['wall_s']:.0f} |")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Equal-budget comparisons with train_joint.py')
    parser.add_argument('--preset', default='tasks', choices=sorted(PRESETS))
    parser.add_argument('--dataset', default='quickstart', choices=sorted(DATASETS))
    parser.add_argument('-c', '--config', default='configs/quickstart.yaml')
    parser.add_argument('--steps', type=int, default=300, help='optimizer steps per variant')
    parser.add_argument('--name', default=None, help='sweep folder name (default: PRESET-DATASET-STEPS)')
    parser.add_argument('--output', default='runs/sweeps')
    parser.add_argument('--variants', nargs='*', default=None, help='only these variants (names as in the table)')
    parser.add_argument('--evaluate', action='store_true',
                        help='measure each export with python -m timm_joint.evaluate (default: the run\'s validation)')
    parser.add_argument('extra', nargs='*', help='further train_joint.py arguments for every variant (after --)')
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error('--steps must be positive')
    out = ROOT / args.output / (args.name or f'{args.preset}-{args.dataset}-{args.steps}')
    out.mkdir(parents=True, exist_ok=True)
    records = run_sweep(args.preset, config=args.config, dataset=args.dataset, steps=args.steps, out=out,
                        extra=args.extra, variants=args.variants, evaluate=args.evaluate)
    table = render_table(records)
    (out / f'{args.preset}.json').write_text(json.dumps({'schema_version': 1, 'preset': args.preset,
                                                  'dataset': args.dataset, 'steps': args.steps,
                                                  'config': args.config, 'records': records}, indent=2))
    (out / f'{args.preset}.md').write_text(table + '\n')
    print(table)


if __name__ == '__main__':
    main()
