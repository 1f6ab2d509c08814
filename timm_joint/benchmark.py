"""Speed and memory, side by side: ``python -m timm_joint.benchmark``.

One run measures, for each image size and device, the throughput (median over repeats, after a
warm-up) and the peak memory of:

    GradResNet (ours)   classification forward, forward with grad enabled (the memory reference),
                        blind denoise D(y), class-conditional denoise D(y, c), and the training steps
                        of the classification, denoising and joint objectives (AdamW);
    JEM-style step      the previous joint approach on the same backbone (Grathwohl et al. 2019):
                        K SGLD steps on logsumexp_c l_c(x) from a replay buffer, then
                        CE + E(x_data) - E(x_sample) with E = -logsumexp(logits);
    timm resnet18       forward and training step with the same stem (3x3 stride-1, no max-pool at
                        32 px; the standard stem at 224 px);
    deepinv             DnCNN and DRUNet denoising (optional extra ``denoisers``; random weights).

Timing: all cases of one (device, size) run in one fresh process, interleaved (round-robin), so that
a change in machine load hits them alike. Memory: each case again in a fresh process of its own
(multiprocessing 'spawn'): the growth of the peak resident set over its value after the model and
inputs are built (CPU), or ``torch.cuda.max_memory_allocated`` over the allocated memory then (CUDA).

The run prints Markdown tables (ratios to our classification forward and to timm's resnet18), the
targets of issue 6 as measured / target with pass or miss, and writes a versioned JSON file that
``validate_results`` checks.

Example::

    python -m timm_joint.benchmark --img-size 32 224 --batch-size 32 4 --repeats 5 --out bench.json
    python -m timm_joint.benchmark --smoke --out smoke.json     # tiny model, seconds, for CI
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import check_out_file, program_name, run_or_exit
from .io import atomic_write

__all__ = ['CASES', 'TARGETS', 'SCHEMA_NAME', 'SCHEMA_VERSION', 'run_benchmark', 'validate_results',
           'render_markdown', 'jem_sgld_sample', 'main']

SCHEMA_NAME = 'timm_joint.benchmark'
SCHEMA_VERSION = 1

# name -> (label, mode, family). 'eval' rows compare with timm's forward, 'train' rows with its step.
CASES: Dict[str, Tuple[str, str, str]] = {
    'cls_forward': ('classification forward (no grad)', 'eval', 'ours'),
    'forward_grad': ('forward, grad enabled (memory reference)', 'eval', 'ours'),
    'denoise_blind': ('blind denoise D(y)', 'eval', 'ours'),
    'denoise_cond': ('class-conditional denoise D(y, c)', 'eval', 'ours'),
    'train_cls': ('classification-only training step', 'train', 'ours'),
    'train_den': ('denoising-only training step', 'train', 'ours'),
    'train_joint': ('joint training step (B cls + B den)', 'train', 'ours'),
    'train_jem': ('JEM-style training step (K SGLD steps)', 'train', 'ours'),
    'timm_forward': ('timm resnet18 forward (no grad)', 'eval', 'timm'),
    'timm_train': ('timm resnet18 training step', 'train', 'timm'),
    'dncnn': ('DnCNN denoise (deepinv)', 'eval', 'deepinv'),
    'drunet': ('DRUNet denoise (deepinv)', 'eval', 'deepinv'),
}
STATUSES = ('ok', 'not installed', 'skipped', 'error')

# The targets: (name, description, numerator case, denominator case, quantity, op, {size: target}).
# quantity 'time': ratio of median step times at the same batch size (= per image);
# 'throughput': ratio of images per second; 'memory': ratio of peak memory.
TARGETS: List[Tuple[str, str, str, str, str, str, Dict[int, float]]] = [
    ('denoise_vs_forward', 'blind denoise time / classification forward time',
     'denoise_blind', 'cls_forward', 'time', '<=', {32: 2.0, 224: 2.0}),
    ('den_step_vs_cls_step', 'denoising training step / classification training step (per image)',
     'train_den', 'train_cls', 'time', '<=', {32: 2.3, 224: 2.3}),
    ('jem_vs_joint', 'JEM-style step time / joint step time',
     'train_jem', 'train_joint', 'time', '>=', {32: 5.0, 224: 5.0}),
    ('denoise_vs_drunet', 'blind denoise throughput / DRUNet throughput',
     'denoise_blind', 'drunet', 'throughput', '>=', {32: 2.0, 224: 8.0}),
    ('denoise_memory', 'blind denoise peak memory / forward-with-grad peak memory',
     'denoise_blind', 'forward_grad', 'memory', '<=', {32: 1.5, 224: 1.5}),
]

DEFAULT_MODELS = {32: 'gradresnet18_joint', 224: 'gradresnet18_joint_224'}
DEFAULT_BATCH = {32: 64, 224: 8}
EVAL_SIGMA = 25 / 255  # noise level of the eval inputs (the blind denoiser ignores it)


# ------------------------------------------------------------------------------------------------
# Workloads (run inside the worker process)
# ------------------------------------------------------------------------------------------------

def _timm_resnet18(img_size: int, num_classes: int, device: torch.device) -> nn.Module:
    """timm's resnet18 with the stem GradResNet uses at this size (no max-pool at 32 px)."""
    import timm
    model = timm.create_model('resnet18', num_classes=num_classes)
    if img_size == 32:
        # The usual CIFAR stem: 3x3 stride-1 conv, no max-pool, like GradResNet's '32' stem.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model.to(device)


def jem_sgld_sample(
        model: nn.Module,
        x_init: torch.Tensor,
        n_steps: int = 20,
        step_size: float = 1.0,
        noise_std: float = 0.01,
) -> torch.Tensor:
    """SGLD on log p(x) = logsumexp_c l_c(x) + const (JEM, Grathwohl et al. 2019).

    x_{k+1} = x_k + step_size * grad_x logsumexp(l(x_k)) + noise_std * N(0, I), as JEM's sampler
    (its default step size 1 and noise 0.01); the model runs in eval mode meanwhile, as in JEM.

    Args:
        model: A classifier returning logits [B, num_classes].
        x_init: Starting points [B, C, H, W] (replay buffer or noise).
        n_steps: Number of SGLD steps K.
        step_size: Step on the gradient.
        noise_std: Standard deviation of the added Gaussian noise.

    Returns:
        Samples [B, C, H, W], detached.
    """
    was_training = model.training
    model.eval()
    x = x_init.detach()
    with torch.enable_grad():
        for _ in range(n_steps):
            x = x.requires_grad_(True)
            lse = model(x).logsumexp(dim=1).sum()
            (g,) = torch.autograd.grad(lse, x)
            x = (x + step_size * g + noise_std * torch.randn_like(x)).detach()
    model.train(was_training)
    return x


class _JEMStep:
    """One JEM training step: sample by SGLD from a replay buffer, then CE + (E(x) - E(x_q)).

    The data batch serves both terms and the data and sample batches go through one forward
    (GroupNorm is per sample, so this equals two forwards): the cheapest faithful JEM step, which
    makes the joint-vs-JEM comparison conservative.
    """

    def __init__(self, model, optimizer, x, target, n_steps, buffer_size, reinit_freq=0.05, seed=0):
        self.model, self.optimizer, self.x, self.target = model, optimizer, x, target
        self.n_steps, self.reinit_freq = n_steps, reinit_freq
        self.gen = torch.Generator(device=x.device).manual_seed(seed)
        # JEM's buffer starts as uniform noise over the pixel range ([0, 1] here).
        self.buffer = torch.rand((buffer_size, *x.shape[1:]), generator=self.gen, device=x.device)

    def __call__(self):
        b = self.x.shape[0]
        idx = torch.randint(0, self.buffer.shape[0], (b,), generator=self.gen, device=self.x.device)
        x0 = self.buffer[idx]
        reinit = torch.rand(b, generator=self.gen, device=self.x.device) < self.reinit_freq
        x0 = torch.where(reinit.view(-1, 1, 1, 1), torch.rand_like(x0), x0)
        x_q = jem_sgld_sample(self.model, x0, n_steps=self.n_steps)
        self.buffer[idx] = x_q

        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(torch.cat([self.x, x_q])).float()
        logits_d, logits_q = logits[:b], logits[b:]
        energy_d, energy_q = -logits_d.logsumexp(1), -logits_q.logsumexp(1)
        loss = F.cross_entropy(logits_d, self.target) + (energy_d.mean() - energy_q.mean())
        loss.backward()
        self.optimizer.step()


def _build_case(spec: Dict[str, Any], device: torch.device) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """Build the model and inputs of one case; returns (step, info)."""
    import timm
    import timm_joint  # noqa: F401  (registers the GradResNet models)
    from timm_joint.losses import JointLoss, JointObjective
    from timm_joint.noise import sample_sigma

    case, size, b = spec['case'], spec['img_size'], spec['batch_size']
    gen = torch.Generator().manual_seed(spec.get('seed', 0))
    x = torch.rand((b, 3, size, size), generator=gen).to(device)
    eps = torch.randn((b, 3, size, size), generator=gen).to(device)
    y = (x + EVAL_SIGMA * eps)
    info: Dict[str, Any] = {}
    family = CASES[case][2]

    if family == 'deepinv':
        try:
            from deepinv.models import DnCNN, DRUNet
        except ImportError:
            raise _NotInstalled('deepinv is not installed (pip install "timm-joint[denoisers]")')
        # pretrained=None: random weights, never a download; speed does not depend on the weights.
        net = (DnCNN(in_channels=3, out_channels=3, pretrained=None, device=device) if case == 'dncnn'
               else DRUNet(in_channels=3, out_channels=3, pretrained=None, device=device)).eval()
        info['params'] = sum(p.numel() for p in net.parameters())
        if case == 'drunet':  # non-blind: it takes the noise level as an extra input map
            def step():
                with torch.no_grad():
                    return net(y, EVAL_SIGMA)
        else:
            def step():
                with torch.no_grad():
                    return net(y)
        return step, info

    if family == 'timm':
        model = _timm_resnet18(size, spec['num_classes'], device)
    else:
        model = timm.create_model(spec['model'], num_classes=spec['num_classes']).to(device)
    info['params'] = sum(p.numel() for p in model.parameters())
    if spec.get('channels_last'):
        model = model.to(memory_format=torch.channels_last)
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, spec['num_classes'], (b,), generator=gen).to(device)

    if CASES[case][1] == 'eval':
        model.eval()
        if case in ('cls_forward', 'timm_forward'):
            def step():
                with torch.no_grad():
                    return model(y)
        elif case == 'forward_grad':
            # Grad enabled and parameters requiring grad: the forward stores the activations a
            # backward would need, as the denoiser's forward does.
            def step():
                with torch.enable_grad():
                    return model(y)
        elif case == 'denoise_blind':
            def step():
                with torch.no_grad():  # an evaluation loop's context; denoise re-enables grad inside
                    return model.denoise(y)
        elif case == 'denoise_cond':
            def step():
                with torch.no_grad():
                    return model.denoise(y, sigma=EVAL_SIGMA, c=target)
        else:
            raise ValueError(f'unknown eval case {case!r}')
        return step, info

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if case == 'timm_train':
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(y), target)
            loss.backward()
            optimizer.step()
        return step, info
    if case == 'train_jem':
        info['sgld_steps'] = spec['jem_steps']
        return _JEMStep(model, optimizer, y, target, n_steps=spec['jem_steps'],
                        buffer_size=max(2 * b, 64), seed=spec.get('seed', 0)), info

    # Ours: JointObjective + JointLoss + backward + AdamW, noise drawn as in training (DESIGN §1).
    task = {'train_cls': 'classification', 'train_den': 'denoising', 'train_joint': 'joint'}[case]
    objective = JointObjective(model, task).train()
    loss_fn = JointLoss(lambda_den=1.0)
    sigma_cls = sample_sigma(b, 0.2, generator=gen).to(device)
    sigma_den = sample_sigma(b, 0.4, generator=gen).to(device)
    x_den = torch.rand((b, 3, size, size), generator=gen).to(device)
    eps_den = torch.randn((b, 3, size, size), generator=gen).to(device)
    y_cls = x + sigma_cls.view(-1, 1, 1, 1) * eps
    y_den = x_den + sigma_den.view(-1, 1, 1, 1) * eps_den
    if spec.get('channels_last'):
        y_cls = y_cls.contiguous(memory_format=torch.channels_last)
        y_den = y_den.contiguous(memory_format=torch.channels_last)
    use_cls, use_den = task in ('classification', 'joint'), task in ('denoising', 'joint')

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = objective(y_cls if use_cls else None, y_den if use_den else None)
        terms = loss_fn(out, target if use_cls else None, x_den if use_den else None, sigma_den)
        terms['loss'].backward()
        optimizer.step()
    return step, info


class _NotInstalled(Exception):
    pass


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _maxrss_bytes() -> int:
    import resource  # Unix only; imported here so that the module imports everywhere
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == 'darwin' else int(rss) * 1024


def _proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f'{field} not in /proc/self/status')


class _PeakRSS:
    """Growth of the peak resident set size of this process from the moment ``start`` is called.

    A spawned process does not start from zero: Linux keeps ru_maxrss across execve, and the
    exec'd image's high-water mark counts every page the parent had resident, so a worker of a
    large parent reported a growth of 0 here. On Linux the per-image high-water mark (VmHWM) is
    reset at the baseline (/proc/self/clear_refs, '5') and read back at the end; elsewhere the
    ru_maxrss growth is used.
    """

    def start(self):
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.base, self.method = _proc_status_bytes('VmRSS'), 'VmHWM'
        except OSError:
            self.base, self.method = _maxrss_bytes(), 'ru_maxrss'

    def peak(self) -> int:
        now = _proc_status_bytes('VmHWM') if self.method == 'VmHWM' else _maxrss_bytes()
        return max(0, now - self.base)


def _set_sgld_steps(step: Any, n: Optional[int]):
    if isinstance(step, _JEMStep) and n is not None:
        step.n_steps = n


def _time_group(specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Time the cases of one (device, size) in one process, interleaved.

    Every case is built and warmed up, then each of ``repeats`` rounds runs every case once in
    turn: a change of machine load during the run (other processes on a shared CPU) then hits all
    cases alike, and the ratios between them stay meaningful. Each case reports the median of its
    rounds. The JEM-style case runs only ``jem_repeats`` rounds and warms up with one SGLD step
    per call (the same kernels and buffers as K steps, at 1/K of the cost).
    """
    results = [_empty_result(s) for s in specs]
    if not specs:
        return results
    first = specs[0]
    device = torch.device(first['device'])
    if first.get('threads'):
        torch.set_num_threads(int(first['threads']))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    steps: Dict[int, Callable[[], Any]] = {}
    for i, spec in enumerate(specs):
        try:
            step, info = _build_case(spec, device)
            results[i].update(info)
            _set_sgld_steps(step, 1)
            for _ in range(spec['warmup']):
                step()
            _set_sgld_steps(step, spec['jem_steps'])
            _sync(device)
            steps[i] = step
        except _NotInstalled as e:
            results[i]['status'], results[i]['error'] = 'not installed', str(e)
        except Exception as e:  # a case that fails (e.g. out of memory) is reported, not fatal
            results[i]['status'], results[i]['error'] = 'error', f'{type(e).__name__}: {e}'
    times: Dict[int, List[float]] = {i: [] for i in steps}
    for r in range(first['repeats']):
        for i, step in list(steps.items()):
            if specs[i]['case'] == 'train_jem' and r >= specs[i]['jem_repeats']:
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[i].append(time.perf_counter() - t0)
            except Exception as e:
                results[i]['status'], results[i]['error'] = 'error', f'{type(e).__name__}: {e}'
                del steps[i]
    for i in steps:
        results[i]['times_s'] = times[i]
        results[i]['median_s'] = statistics.median(times[i])
        results[i]['img_per_s'] = specs[i]['batch_size'] / results[i]['median_s']
        results[i]['status'] = 'ok'
    return results


def _memory_case(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Peak memory of one case, meant to run in a fresh process.

    Builds the case, takes the baseline (resident set size on CPU, see ``_PeakRSS``; allocated
    memory on CUDA), runs
    ``memory_steps`` steps (two: the second one already holds the optimizer state) and returns
    the growth of the peak. The JEM-style case runs one SGLD step per call: each SGLD step frees
    its graph, so K does not change the peak.
    """
    device = torch.device(spec['device'])
    out: Dict[str, Any] = {'peak_mem_bytes': None, 'mem_method': None, 'mem_error': None}
    if spec.get('threads'):
        torch.set_num_threads(int(spec['threads']))
    try:
        step, _ = _build_case(spec, device)
        _set_sgld_steps(step, 1)
        _sync(device)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            rss = _PeakRSS()
            rss.start()
        for _ in range(spec['memory_steps']):
            step()
        _sync(device)
        if device.type == 'cuda':
            out['peak_mem_bytes'] = int(torch.cuda.max_memory_allocated(device) - base)
            out['mem_method'] = 'cuda.max_memory_allocated'
        else:
            out['peak_mem_bytes'] = rss.peak()
            threshold = os.environ.get('MALLOC_MMAP_THRESHOLD_')
            out['mem_method'] = rss.method + (f' (MALLOC_MMAP_THRESHOLD_={threshold})' if threshold else '')
    except Exception as e:
        out['mem_error'] = f'{type(e).__name__}: {e}'
    return out


def _empty_result(spec: Dict[str, Any]) -> Dict[str, Any]:
    return {
        'case': spec['case'], 'label': CASES[spec['case']][0], 'mode': CASES[spec['case']][1],
        'family': CASES[spec['case']][2], 'model': _case_model(spec),
        'img_size': spec['img_size'], 'batch_size': spec['batch_size'], 'device': spec['device'],
        'status': 'skipped', 'times_s': [], 'median_s': None, 'img_per_s': None,
        'peak_mem_bytes': None, 'mem_method': None, 'error': None,
    }


def _case_model(spec: Dict[str, Any]) -> str:
    family = CASES[spec['case']][2]
    if family == 'timm':
        return 'resnet18 (3x3 stem, no max-pool)' if spec['img_size'] == 32 else 'resnet18'
    if family == 'deepinv':
        return 'DnCNN' if spec['case'] == 'dncnn' else 'DRUNet'
    return spec['model']


# glibc's malloc raises its mmap threshold each time a large block is freed, after which big tensors
# come from the heap and its fragmentation: the same case then gave peaks 30% apart from one run to
# the next here. A fixed threshold sends every large tensor to mmap, so the resident set follows the
# live tensors and repeated runs agree to the MiB. Set for the memory processes only (timing keeps
# the allocator's default behaviour, which is what users run).
MEMORY_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072'}


def _guarded(
        fn: Callable,
        arg: Any,
        isolated: bool,
        on_death: Callable[[str], Any],
        env: Optional[Dict[str, str]] = None,
) -> Any:
    """``fn(arg)``, in a fresh spawned process when ``isolated``; ``on_death(msg)`` if it dies.

    ``env`` is added to the environment the fresh process starts with.
    """
    if not isolated:
        return fn(arg)
    # By module path, not __main__: the worker imports timm_joint.benchmark however we were started.
    from timm_joint import benchmark as this_module
    ctx = multiprocessing.get_context('spawn')
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(getattr(this_module, fn.__name__), arg).result()
    except concurrent.futures.process.BrokenProcessPool as e:  # e.g. killed for memory
        return on_death(f'worker process died: {e}')
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------
# Orchestration, targets, tables
# ------------------------------------------------------------------------------------------------

def _num_classes(model_name: str) -> int:
    import timm
    import timm_joint  # noqa: F401
    cfg = timm.models.get_pretrained_cfg(model_name)
    return int(getattr(cfg, 'num_classes', None) or 1000)


def _check_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    sizes = list(cfg['img_size'])
    if not sizes or any(s not in DEFAULT_MODELS for s in sizes):
        raise ValueError(f'img_size must be a list drawn from {sorted(DEFAULT_MODELS)}, got {sizes}')
    bs = list(cfg['batch_size'])
    if len(bs) == 1:
        bs = bs * len(sizes)
    if len(bs) != len(sizes) or any(not isinstance(b, int) or b < 1 for b in bs):
        raise ValueError(f'batch_size must be one positive int, or one per image size {sizes}, got {cfg["batch_size"]}')
    for key, low in (('repeats', 1), ('warmup', 0), ('jem_steps', 1), ('jem_repeats', 1), ('memory_steps', 1)):
        if not isinstance(cfg[key], int) or cfg[key] < low:
            raise ValueError(f'{key} must be an int >= {low}, got {cfg[key]!r}')
    unknown = [c for c in cfg['cases'] if c not in CASES]
    if unknown or not cfg['cases']:
        raise ValueError(f'cases must be drawn from {list(CASES)}, got {cfg["cases"]}')
    for d in cfg['devices']:
        if d not in ('cpu', 'cuda'):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {d!r}")
        if d == 'cuda' and not torch.cuda.is_available():
            raise ValueError('device cuda requested but torch.cuda.is_available() is False')
    return dict(cfg, img_size=sizes, batch_size=bs)


def run_benchmark(cfg: Dict[str, Any], log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every (device, size, case) of a config; returns the results document (see the schema).

    Args:
        cfg: Config with keys img_size, batch_size, repeats, warmup, jem_steps, jem_repeats,
            memory_steps, models ({size: name}), devices, cases, isolated, skip_deepinv,
            channels_last, threads, seed.
        log: Progress printer.
    """
    cfg = _check_config(cfg)
    results = []
    for device in cfg['devices']:
        for size, b in zip(cfg['img_size'], cfg['batch_size']):
            model = cfg['models'][size]
            num_classes = _num_classes(model)
            specs = [dict(case=case, img_size=size, batch_size=b, device=device, model=model,
                          num_classes=num_classes, repeats=cfg['repeats'], warmup=cfg['warmup'],
                          jem_steps=cfg['jem_steps'], jem_repeats=cfg['jem_repeats'],
                          memory_steps=cfg['memory_steps'], seed=cfg['seed'],
                          channels_last=cfg['channels_last'], threads=cfg['threads'])
                     for case in cfg['cases']]
            skip = [cfg['skip_deepinv'] and CASES[s['case']][2] == 'deepinv' for s in specs]
            to_run = [s for s, k in zip(specs, skip) if not k]
            where = f'[{device} {size}px b{b}]'
            log(f'{where} timing {len(to_run)} cases, {cfg["repeats"]} interleaved rounds ...')
            t0 = time.perf_counter()
            timed = iter(_guarded(_time_group, to_run, cfg['isolated'], lambda e: [
                dict(_empty_result(s), status='error', error=e) for s in to_run]))
            group = []
            for spec, k in zip(specs, skip):
                if k:
                    group.append(dict(_empty_result(spec), error='skipped (smoke mode)'))
                    continue
                res = next(timed)
                log(f'{where} {spec["case"]}: {res["status"]}'
                    + (f', {1e3 * res["median_s"]:.1f} ms/step' if res['median_s'] else '')
                    + (f' ({res["error"]})' if res['error'] else ''))
                group.append(res)
            log(f'{where} timing done in {time.perf_counter() - t0:.0f} s; peak memory, one process per case ...')
            t0 = time.perf_counter()
            for spec, res in zip(specs, group):
                if res['status'] != 'ok':
                    continue
                if cfg['isolated'] or device == 'cuda':
                    mem = _guarded(_memory_case, spec, cfg['isolated'],
                                   lambda e: {'peak_mem_bytes': None, 'mem_method': None, 'mem_error': e},
                                   env=MEMORY_ENV if device == 'cpu' else None)
                else:  # ru_maxrss is a whole-process high-water mark: meaningless after other cases
                    mem = {'peak_mem_bytes': None, 'mem_method': 'not measured (in-process)', 'mem_error': None}
                res['peak_mem_bytes'], res['mem_method'] = mem['peak_mem_bytes'], mem['mem_method']
                if mem['mem_error']:
                    res['error'] = f'memory: {mem["mem_error"]}'
            log(f'{where} memory done in {time.perf_counter() - t0:.0f} s')
            results += group
    doc = {
        'schema': SCHEMA_NAME,
        'schema_version': SCHEMA_VERSION,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'config': {k: (v if k != 'models' else {str(s): m for s, m in v.items()}) for k, v in cfg.items()},
        'environment': _environment(cfg['devices']),
        'results': results,
    }
    doc['targets'] = compute_targets(results)
    return doc


def _environment(devices: Sequence[str]) -> Dict[str, Any]:
    import timm
    try:
        import deepinv
        deepinv_version = deepinv.__version__
    except ImportError:
        deepinv_version = None
    env = {
        'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
        'deepinv': deepinv_version, 'platform': platform.platform(), 'cpu': _cpu_model(),
        'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
    }
    if 'cuda' in devices:
        env['cuda_device'] = torch.cuda.get_device_name()
        env['cuda'] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def _find(results, case, size, device):
    for r in results:
        if r['case'] == case and r['img_size'] == size and r['device'] == device and r['status'] == 'ok':
            return r
    return None


def _ratio(num: Dict[str, Any], den: Dict[str, Any], quantity: str) -> Optional[float]:
    if quantity == 'time':
        # Same batch size within a size, so the ratio of step times is the per-image ratio.
        return num['median_s'] / num['batch_size'] / (den['median_s'] / den['batch_size'])
    if quantity == 'throughput':
        return num['img_per_s'] / den['img_per_s']
    if num['peak_mem_bytes'] is None or den['peak_mem_bytes'] is None or den['peak_mem_bytes'] <= 0:
        return None
    return num['peak_mem_bytes'] / den['peak_mem_bytes']


def compute_targets(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets from one run's results: value, target, value / target, pass or miss."""
    out = []
    pairs = sorted({(r['device'], r['img_size']) for r in results})
    for device, size in pairs:
        for name, desc, num_case, den_case, quantity, op, by_size in TARGETS:
            if size not in by_size:
                continue
            num, den = _find(results, num_case, size, device), _find(results, den_case, size, device)
            value = _ratio(num, den, quantity) if num and den else None
            target = by_size[size]
            passed = None if value is None else (value <= target if op == '<=' else value >= target)
            missing = [c for c, r in ((num_case, num), (den_case, den)) if r is None]
            out.append({
                'name': name, 'description': desc, 'device': device, 'img_size': size, 'op': op,
                'target': target, 'value': value, 'passed': passed,
                'note': f'no result for {", ".join(missing)}' if missing else (
                    'no memory measurement' if value is None else None),
            })
    return out


def _fmt(v: Optional[float], spec: str = '.2f', suffix: str = '') -> str:
    return '-' if v is None else f'{v:{spec}}{suffix}'


def render_markdown(doc: Dict[str, Any]) -> str:
    """Markdown tables of a results document: one per (device, size), then the targets."""
    lines = []
    results = doc['results']
    for device, size in sorted({(r['device'], r['img_size']) for r in results}):
        rows = [r for r in results if r['device'] == device and r['img_size'] == size]
        b = rows[0]['batch_size']
        ref = _find(results, 'cls_forward', size, device)
        ref_mem = _find(results, 'forward_grad', size, device)
        timm_ref = {'eval': _find(results, 'timm_forward', size, device),
                    'train': _find(results, 'timm_train', size, device)}
        cfg = doc['config']
        lines += [f'**{device}, {size} px, batch {b}** (median of {cfg["repeats"]} repeats, '
                  f'{cfg["jem_repeats"]} for JEM with K={cfg["jem_steps"]}; '
                  f'x cls fwd: time per image / our classification forward; x timm: time per image / '
                  f"timm resnet18's forward (eval rows) or training step (train rows); "
                  f'mem: peak over the post-build baseline, x fwd+grad: / our forward with grad)', '',
                  '| case | model | ms/step | img/s | x cls fwd | x timm | peak mem (MiB) | x fwd+grad mem |',
                  '|---|---|---:|---:|---:|---:|---:|---:|']
        for r in rows:
            if r['status'] != 'ok':
                lines.append(f'| {r["label"]} | {r["model"]} | {r["status"]} | | | | | |')
                continue
            tr = timm_ref[r['mode']]
            mem = r['peak_mem_bytes']
            lines.append(
                f'| {r["label"]} | {r["model"]} | {1e3 * r["median_s"]:.1f} | {r["img_per_s"]:.1f} '
                f'| {_fmt(_ratio(r, ref, "time") if ref else None)} '
                f'| {_fmt(_ratio(r, tr, "time") if tr else None)} '
                f'| {_fmt(None if mem is None else mem / 2 ** 20, ".0f")} '
                f'| {_fmt(_ratio(r, ref_mem, "memory") if ref_mem else None)} |')
        lines.append('')
    lines += ['**Targets** (value / target < 1 passes an upper bound, > 1 a lower bound)', '',
              '| target | device | size | measured | target | measured / target | result |',
              '|---|---|---:|---:|---:|---:|---|']
    for t in doc['targets']:
        result = {True: 'pass', False: 'MISS', None: 'n/a'}[t['passed']]
        if t['note']:
            result += f' ({t["note"]})'
        lines.append(
            f'| {t["description"]} | {t["device"]} | {t["img_size"]} px | {_fmt(t["value"], ".2f", "x")} '
            f'| {t["op"]} {t["target"]:g}x | {_fmt(None if t["value"] is None else t["value"] / t["target"])} '
            f'| {result} |')
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------
# Schema validation
# ------------------------------------------------------------------------------------------------

def validate_results(doc: Any) -> None:
    """Check a results document against schema version 1; raise ValueError listing every problem.

    Beyond types and keys it checks internal consistency: each median is the median of its
    repeats, each throughput is batch / median, each target's verdict agrees with its value.
    """
    errors: List[str] = []

    def need(cond: bool, msg: str):
        if not cond:
            errors.append(msg)

    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(doc, dict):
        raise ValueError(f'expected a JSON object, got {type(doc).__name__}')
    need(doc.get('schema') == SCHEMA_NAME, f'schema must be {SCHEMA_NAME!r}, got {doc.get("schema")!r}')
    need(doc.get('schema_version') == SCHEMA_VERSION,
         f'schema_version must be {SCHEMA_VERSION}, got {doc.get("schema_version")!r}')
    for key in ('config', 'environment'):
        need(isinstance(doc.get(key), dict), f'{key} must be an object')
    if isinstance(doc.get('config'), dict):
        for key in ('img_size', 'batch_size', 'repeats', 'warmup', 'jem_steps', 'devices', 'cases'):
            need(key in doc['config'], f'config.{key} is missing')
    if isinstance(doc.get('environment'), dict):
        for key in ('torch', 'timm', 'cpu'):
            need(isinstance(doc['environment'].get(key), str), f'environment.{key} must be a string')
    results = doc.get('results')
    need(isinstance(results, list) and len(results) > 0, 'results must be a non-empty list')
    for i, r in enumerate(results if isinstance(results, list) else []):
        where = f'results[{i}]'
        if not isinstance(r, dict):
            errors.append(f'{where} must be an object')
            continue
        need(r.get('case') in CASES, f'{where}.case must be one of {list(CASES)}, got {r.get("case")!r}')
        need(r.get('status') in STATUSES, f'{where}.status must be one of {STATUSES}, got {r.get("status")!r}')
        for key in ('img_size', 'batch_size'):
            need(isinstance(r.get(key), int) and not isinstance(r.get(key), bool) and r.get(key) > 0,
                 f'{where}.{key} must be a positive int, got {r.get(key)!r}')
        need(isinstance(r.get('device'), str), f'{where}.device must be a string')
        times = r.get('times_s')
        need(isinstance(times, list), f'{where}.times_s must be a list')
        if r.get('status') != 'ok':
            need(r.get('median_s') is None and r.get('img_per_s') is None,
                 f'{where}: a case that did not run has no median_s or img_per_s')
            continue
        if not (isinstance(times, list) and times and all(is_num(t) and t > 0 for t in times)):
            errors.append(f'{where}.times_s must be a non-empty list of positive seconds')
            continue
        med, thr = r.get('median_s'), r.get('img_per_s')
        need(is_num(med) and math.isclose(med, statistics.median(times), rel_tol=1e-9),
             f'{where}.median_s must be the median of times_s')
        need(is_num(thr) and is_num(med) and med > 0 and isinstance(r.get('batch_size'), int)
             and math.isclose(thr, r['batch_size'] / med, rel_tol=1e-6),
             f'{where}.img_per_s must be batch_size / median_s')
        mem = r.get('peak_mem_bytes')
        need(mem is None or (isinstance(mem, int) and not isinstance(mem, bool) and mem >= 0),
             f'{where}.peak_mem_bytes must be null or an int >= 0, got {mem!r}')
        need(mem is None or isinstance(r.get('mem_method'), str), f'{where}.mem_method must name the method')
    targets = doc.get('targets')
    need(isinstance(targets, list), 'targets must be a list')
    for i, t in enumerate(targets if isinstance(targets, list) else []):
        where = f'targets[{i}]'
        if not isinstance(t, dict):
            errors.append(f'{where} must be an object')
            continue
        need(t.get('op') in ('<=', '>='), f'{where}.op must be "<=" or ">="')
        need(is_num(t.get('target')) and t.get('target') > 0, f'{where}.target must be a positive number')
        v, p = t.get('value'), t.get('passed')
        if v is None:
            need(p is None, f'{where}: passed must be null when value is null')
        elif not is_num(v) or not isinstance(p, bool):
            errors.append(f'{where}: value must be a number and passed a bool')
        elif t.get('op') in ('<=', '>=') and is_num(t.get('target')):
            ok = v <= t['target'] if t['op'] == '<=' else v >= t['target']
            need(ok == p, f'{where}: passed={p} disagrees with {v} {t["op"]} {t["target"]}')
    if errors:
        raise ValueError('invalid benchmark results:\n  ' + '\n  '.join(errors))



# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name('timm_joint.benchmark'),
        description='Speed and memory of GradResNet (classify, denoise, train) beside timm resnet18, '
                    'a JEM-style step, DnCNN and DRUNet; Markdown tables on stdout, JSON to --out.')
    p.add_argument('--img-size', type=int, nargs='+', default=[32, 224], choices=sorted(DEFAULT_MODELS),
                   help='image sizes (default: 32 224)')
    p.add_argument('--batch-size', type=int, nargs='+', default=None,
                   help='batch size B, one for all sizes or one per size (default: 64 at 32 px, 8 at 224 px)')
    p.add_argument('--repeats', type=int, default=5, help='timed repeats; the median is reported (default 5)')
    p.add_argument('--warmup', type=int, default=2, help='untimed warm-up steps (default 2)')
    p.add_argument('--jem-steps', type=int, default=20, help='SGLD steps K of the JEM-style step (default 20)')
    p.add_argument('--jem-repeats', type=int, default=None,
                   help='timed repeats of the JEM-style step, the costliest case (default: --repeats)')
    p.add_argument('--memory-steps', type=int, default=2,
                   help='steps run in each fresh memory process (default 2: the optimizer state exists)')
    p.add_argument('--model', default=DEFAULT_MODELS[32], help='GradResNet at 32 px (default %(default)s)')
    p.add_argument('--model-224', default=DEFAULT_MODELS[224], help='GradResNet at 224 px (default %(default)s)')
    p.add_argument('--device', nargs='+', default=None,
                   help='cpu and/or cuda (default: cpu, and cuda when available)')
    p.add_argument('--cases', nargs='+', default=None, help=f'subset of the cases: {" ".join(CASES)}')
    p.add_argument('--channels-last', action='store_true', help='channels_last models and inputs')
    p.add_argument('--threads', type=int, default=None, help='torch threads per case (default: torch default)')
    p.add_argument('--in-process', action='store_true',
                   help='run every case in this process (faster; CPU peak memory is then not measured)')
    p.add_argument('--smoke', action='store_true',
                   help='CI mode: gradresnet_tiny_joint, 32 px, batch 4, 1 repeat, 1 warm-up, K=2, '
                        '1 thread, no deepinv')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='benchmark.json', help='JSON results path (default %(default)s)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point (``timm-joint-benchmark``): run, print the tables, write the JSON."""
    args = _parser().parse_args(argv)
    run_or_exit('timm_joint.benchmark', lambda: check_out_file(args.out, '--out'))  # before the benchmark, not after
    devices = args.device or (['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
    cfg = dict(
        img_size=args.img_size, batch_size=args.batch_size or [DEFAULT_BATCH[s] for s in args.img_size],
        repeats=args.repeats, warmup=args.warmup,
        jem_steps=args.jem_steps, jem_repeats=args.jem_repeats or args.repeats,
        memory_steps=args.memory_steps, models={32: args.model, 224: args.model_224}, devices=devices,
        cases=args.cases or list(CASES), isolated=not args.in_process, skip_deepinv=False,
        channels_last=args.channels_last, threads=args.threads, seed=args.seed, smoke=args.smoke)
    if args.smoke:
        cfg.update(img_size=[32], batch_size=[4], repeats=1, warmup=1, jem_steps=2, jem_repeats=1,
                   memory_steps=1, threads=args.threads or 1, skip_deepinv=True,
                   models={32: 'gradresnet_tiny_joint', 224: 'gradresnet_tiny_joint'})
    doc = run_benchmark(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    validate_results(doc)
    print(render_markdown(doc))
    atomic_write(args.out, json.dumps(doc, indent=1) + '\n')
    print(f'wrote {args.out}', file=sys.stderr)


if __name__ == '__main__':
    main()
