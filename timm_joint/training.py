"""Pieces of the training loop (``timm_joint.train``) that are worth testing on their own: state,
checkpoints, noisy batches, validation, the denoising patch schedule and its cycling loader, loaders over
streamed datasets.
"""
import itertools
import json
import logging
import logging.handlers
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .io import atomic_replace_dir
from .metrics import psnr
from .noise import STREAM_EVAL, add_noise, from_255, seeded_noise
from .protocol import denoise_blind

__all__ = [
    'TrainState', 'CheckpointManager', 'DenoisingStage', 'parse_den_schedule', 'stage_for_epoch',
    'noisy_batch', 'validate', 'NonFiniteLossError', 'DeviceLoader', 'skip_batches', 'cycle_loader',
    'DenoisingLoader', 'RunLog', 'LOG_FILE',
]

STATE_FILE = 'train_state.json'
LOG_FILE = 'log.txt'


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, so that a line printed while a progress bar is shown does not break it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


class RunLog:
    """Where a run's lines go.

    The console shows this package's own lines (the model, each validation, the final summary) and
    every library's warnings, beside the progress bars; the run folder's ``log.txt`` gets all of
    them, with times, and what libraries say at INFO, such as Accelerate's line for every file of
    every checkpoint (and lines logged with ``extra={'file_only': True}``). Lines logged before the run
    folder exists (it is made only once every check has passed, so that a refused run writes nothing) are
    held, and written when ``open`` is called.

    Args:
        own: Loggers whose INFO lines reach the console (their names' prefix).
        stream: The console (default: stderr, where tqdm draws).
    """

    FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'

    def __init__(self, own: str = 'timm_joint', stream=None):
        self.own = own
        self.root = logging.getLogger()
        self._saved_level = self.root.level
        self.console = _ConsoleHandler(stream if stream is not None else sys.stderr)
        self.console.setFormatter(logging.Formatter('%(message)s'))
        self.console.addFilter(self._for_console)
        self.console_level = logging.INFO
        # Held until the run folder exists; never flushed before a target is set.
        self.held = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1,
                                                   flushOnClose=False)
        self.held.setLevel(logging.INFO)
        self.file: Optional[logging.Handler] = None
        self.path: Optional[Path] = None
        self.root.setLevel(logging.INFO)
        self.root.addHandler(self.console)
        self.root.addHandler(self.held)

    def _for_console(self, record: logging.LogRecord) -> bool:
        if getattr(record, 'file_only', False):  # logged with extra={'file_only': True}: details for log.txt
            return False
        if record.levelno >= logging.WARNING:
            return True
        own = record.name == self.own or record.name.startswith(self.own + '.')
        return own and record.levelno >= self.console_level

    def quiet(self) -> None:
        """Another process than the main one: warnings and errors on the console, and no log file."""
        self.console_level = logging.WARNING
        self.root.removeHandler(self.held)
        self.held.buffer.clear()

    def open(self, folder: Path) -> Path:
        """Append to ``folder/log.txt`` from now on, the held lines first; returns its path."""
        self.path = Path(folder) / LOG_FILE
        self.file = logging.FileHandler(self.path, mode='a', encoding='utf-8')
        self.file.setLevel(logging.INFO)
        self.file.setFormatter(logging.Formatter(self.FORMAT))
        self.held.setTarget(self.file)
        self.held.flush()
        self.root.removeHandler(self.held)
        self.root.addHandler(self.file)
        return self.path

    def close(self) -> None:
        """Detach every handler this added and restore the root logger's level."""
        for handler in (self.console, self.held, self.file):
            if handler is not None:
                self.root.removeHandler(handler)
        if self.file is not None:
            self.file.close()
        self.held.buffer.clear()
        self.root.setLevel(self._saved_level)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stops, the last good checkpoint stays."""


@dataclass
class TrainState:
    """Counters a resumed run needs beyond the model, optimizer, scheduler, EMA and RNG states."""
    epoch: int = 0               # current epoch of the classification loader (denoising for --task denoising)
    step_in_epoch: int = 0       # batches of that epoch already consumed
    num_updates: int = 0         # optimizer steps taken
    den_epoch: int = 0           # pass over the denoising loader (it cycles)
    den_step: int = 0            # batches of that pass already consumed
    den_stage: int = 0           # index of the denoising patch schedule stage of den_epoch
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None

    def state_dict(self) -> Dict:
        return asdict(self)

    def load_state_dict(self, state: Dict) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, v)


class CheckpointManager:
    """Accelerate state folders ``checkpoints/step_XXXXXXXX``, written atomically, newest ``keep`` kept.

    Every process calls ``save`` (Accelerate writes one RNG file per rank); the folder is filled under a
    temporary name and renamed by the main process once complete, so a kill at any moment leaves the
    previous checkpoint whole. ``latest`` only ever returns complete folders.
    """

    def __init__(self, root: os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def _complete(self) -> List[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir()
                if p.is_dir() and p.name.startswith('step_') and not p.name.endswith(('.tmp', '.old'))
                and (p / STATE_FILE).is_file()]
        return sorted(dirs, key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        dirs = self._complete()
        return dirs[-1] if dirs else None

    def save(self, accelerator, num_updates: int, meta: Dict) -> Path:
        final = self.root / f'step_{num_updates:08d}'
        tmp = self.root / f'step_{num_updates:08d}.tmp'
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # The state file is written last: its presence marks the folder complete.
            with open(tmp / STATE_FILE, 'w') as f:
                json.dump(meta, f, indent=2)
            atomic_replace_dir(tmp, final)
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


def read_checkpoint_meta(path: os.PathLike) -> Dict:
    """Read and check a state folder's metadata; ValueError if it is not a complete checkpoint."""
    path = Path(path)
    expected = 'a checkpoint folder runs/NAME/checkpoints/step_XXXXXXXX written by timm_joint.train, or "auto"'
    if path.exists() and not path.is_dir():
        raise ValueError(f'--resume {str(path)!r} is a file: expected {expected}')
    if not path.is_dir():
        raise ValueError(f'--resume {str(path)!r} does not exist: expected {expected}')
    state = path / STATE_FILE
    if not state.is_file():
        raise ValueError(
            f'--resume {str(path)!r} is not a complete checkpoint (no {STATE_FILE}): expected a folder '
            f'checkpoints/step_XXXXXXXX written by timm_joint.train (train_joint.py)')
    try:
        with open(state) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'--resume {str(path)!r}: {STATE_FILE} is corrupt ({e})') from e


@dataclass
class DenoisingStage:
    """From ``epoch`` on, denoising patches of ``patch_size`` in batches of ``batch_size``."""
    epoch: int
    patch_size: int
    batch_size: int


def parse_den_schedule(spec: Optional[Sequence[str]], patch_size: int, batch_size: int) -> List[DenoisingStage]:
    """Parse ``['0:128:32', '10:160:20', ...]`` (epoch:patch:batch), progressive as in Restormer's training.

    Without a spec, one stage at (patch_size, batch_size).
    """
    if not spec:
        return [DenoisingStage(0, patch_size, batch_size)]
    stages = []
    for item in spec:
        parts = str(item).split(':')
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f'--den-schedule entries are EPOCH:PATCH:BATCH (integers), got {item!r}')
        e, p, b = (int(x) for x in parts)
        if p <= 0 or b <= 0:
            raise ValueError(f'--den-schedule patch and batch sizes must be positive, got {item!r}')
        stages.append(DenoisingStage(e, p, b))
    stages.sort(key=lambda s: s.epoch)
    if stages[0].epoch != 0:
        raise ValueError(f'--den-schedule must start at epoch 0, got {spec}')
    if len({s.epoch for s in stages}) != len(stages):
        raise ValueError(f'--den-schedule has two stages starting at the same epoch: {spec}')
    return stages


def stage_for_epoch(stages: Sequence[DenoisingStage], epoch: int) -> int:
    idx = 0
    for i, s in enumerate(stages):
        if s.epoch <= epoch:
            idx = i
    return idx


def noisy_batch(
        x: torch.Tensor,
        indices: torch.Tensor,
        *,
        sigma_max: Optional[float] = None,
        sigma: Optional[float] = None,
        seed: int,
        epoch: int,
        stream: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise a batch with draws seeded by (seed, stream, epoch, sample index).

    Returns:
        (y [B, C, H, W], sigma [B]) on x's device.
    """
    sig, eps = seeded_noise(indices, tuple(x.shape[1:]), sigma_max=sigma_max, sigma=sigma,
                            seed=seed, epoch=epoch, stream=stream)
    sig = sig.to(x.device)
    return add_noise(x, sig, eps.to(x.device)), sig


@torch.no_grad()
def validate(
        model: nn.Module,
        loader,
        accelerator,
        *,
        acc_sigmas_255: Sequence[float],
        psnr_sigmas_255: Sequence[float],
        seed: int,
        do_cls: bool = True,
        do_den: bool = True,
        progress: bool = True,
        streamed: bool = False,
) -> Dict[str, float]:
    """Top-1 at each noise level and blind-denoiser PSNR at each noise level, over the whole loader.

    Noise is seeded by sample index (stream STREAM_EVAL), so the numbers do not depend on the number
    of processes. Per-sample values are gathered with ``gather_for_metrics`` (no padding duplicates);
    with ``streamed`` (a loader that is not prepared, whose ranks may hold different numbers of batches)
    each rank sums its own values and the sums and counts are reduced once at the end.

    Returns:
        {'top1_s0': %, 'top1_s25': %, ..., 'psnr_s15': dB, ..., 'num_images': images evaluated}
    """
    from tqdm import tqdm
    model.eval()
    sums: Dict[str, List[torch.Tensor]] = {}
    it = tqdm(loader, desc='eval', leave=False, disable=not (progress and accelerator.is_local_main_process))
    for x, target, idx in it:
        per_sample = {}
        if do_cls:
            for s in acc_sigmas_255:
                y = x if s == 0 else noisy_batch(x, idx, sigma=from_255(s), seed=seed, epoch=0, stream=STREAM_EVAL)[0]
                with accelerator.autocast():
                    logits = model(y)
                per_sample[f'top1_s{s:g}'] = (logits.argmax(-1) == target).float() * 100
        if do_den:
            for s in psnr_sigmas_255:
                y, sig = noisy_batch(x, idx, sigma=from_255(s), seed=seed, epoch=0, stream=STREAM_EVAL)
                with accelerator.autocast():
                    d = denoise_blind(model, y, sig)  # only a non-blind baseline (DRUNet) is told sigma
                per_sample[f'psnr_s{s:g}'] = psnr(d, x).float()
        for k, v in per_sample.items():
            sums.setdefault(k, []).append(v.float() if streamed else accelerator.gather_for_metrics(v.float()))
    if not streamed:
        out = {k: float(torch.cat(v).mean()) for k, v in sums.items()}
        if sums:
            out['num_images'] = len(torch.cat(next(iter(sums.values()))))
        return out
    keys = ([f'top1_s{s:g}' for s in acc_sigmas_255] if do_cls else []) + (
        [f'psnr_s{s:g}' for s in psnr_sigmas_255] if do_den else [])
    totals = torch.tensor([[float(torch.cat(sums[k]).sum()) if k in sums else 0.,
                            float(sum(len(t) for t in sums.get(k, [])))] for k in keys],
                          device=accelerator.device)  # float32: MPS has no float64
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction='sum')
    out = {k: float(t[0] / t[1]) for k, t in zip(keys, totals.cpu()) if t[1] > 0}
    if out:
        out['num_images'] = int(totals[0, 1])
    return out


def finite_or_raise(loss: torch.Tensor, accelerator, step: int) -> None:
    """Raise NonFiniteLossError on every rank if any rank's loss is not finite."""
    bad = torch.tensor([0. if torch.isfinite(loss.detach()).all() else 1.], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction='sum')
    if float(bad) > 0:
        raise NonFiniteLossError(
            f'non-finite loss at optimizer step {step}: training stopped; the last good checkpoint '
            f'and exported weights are kept as they were')


class DeviceLoader:
    """A DataLoader over a streamed dataset (``timm_joint.data.IndexedIterableDataset``), batches on ``device``.

    timm's streaming readers already split the data across ranks and loader workers, so this loader is
    not given to ``accelerator.prepare`` (which would split it again or dispatch it from rank 0); it only
    moves batches to the device, as a prepared loader would.
    """

    def __init__(self, loader, device: torch.device):
        self.loader = loader
        self.device = device

    @property
    def dataset(self):
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.loader.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return self.iter_from(0)

    def iter_from(self, skip: int) -> Iterator:
        """The batches after the first ``skip``, which are read and dropped without reaching the device."""
        from accelerate.utils import send_to_device
        non_blocking = self.device.type == 'cuda'
        for batch in itertools.islice(self.loader, skip, None):
            yield send_to_device(batch, self.device, non_blocking=non_blocking)


def skip_batches(loader, num_batches: int):
    """The loader's batches after the first ``num_batches`` (for a resume in the middle of an epoch).

    A prepared loader skips in its sampler (Accelerate's ``skip_first_batches``); a stream has no
    sampler, so its first batches are read and dropped (the order is fixed by seed and epoch).
    """
    if isinstance(loader, DeviceLoader):
        return loader.iter_from(num_batches)
    from accelerate import skip_first_batches
    return skip_first_batches(loader, num_batches)


def cycle_loader(loader, state: TrainState, skip: int = 0) -> Iterator:
    """Iterate the denoising loader forever, advancing ``state.den_epoch`` and ``state.den_step``."""
    first = True
    while True:
        if hasattr(loader, 'set_epoch'):
            loader.set_epoch(state.den_epoch)
        ds = getattr(loader, 'dataset', None)
        if hasattr(ds, 'set_epoch'):
            ds.set_epoch(state.den_epoch)
        it = loader
        if first and skip:
            it = skip_batches(loader, skip)
        first = False
        for batch in it:
            state.den_step += 1
            yield batch
        state.den_epoch += 1
        state.den_step = 0


class DenoisingLoader:
    """The denoising batches of a run: a loader that cycles, rebuilt when the patch schedule changes stage.

    The denoising loader is stepped in lockstep with the classification loader and cycles on its own
    (DESIGN §2); its position is kept in ``state`` (``den_stage``, ``den_epoch``, ``den_step``), so a
    resumed run continues mid-cycle. Call ``set_epoch`` at the start of every epoch, then ``next()``.

    Args:
        dataset: The denoising dataset; its patch size is set for each stage.
        stages: The patch schedule (``parse_den_schedule``).
        state: The run's state, advanced here.
        make_loader: Builds a loader ready for the device (prepared, or a ``DeviceLoader``) over
            ``(dataset, batch_size)``.
        hflip: Horizontal flip probability of the denoising crops.
    """

    def __init__(
            self,
            dataset,
            stages: Sequence[DenoisingStage],
            state: TrainState,
            make_loader: Callable[[object, int], object],
            hflip: float,
    ):
        self.dataset = dataset
        self.stages = stages
        self.state = state
        self.make_loader = make_loader
        self.hflip = hflip
        self.loader = None
        self.stage_idx: Optional[int] = None
        self._iter: Optional[Iterator] = None

    def set_epoch(self, epoch: int) -> bool:
        """Enter ``epoch``'s stage of the schedule; returns True if a new loader was built for it."""
        from .data import set_denoising_patch
        stage_idx = stage_for_epoch(self.stages, epoch)
        if self.loader is not None and stage_idx == self.stage_idx:
            return False
        stage = self.stages[stage_idx]
        # A resume into the stage it stopped in continues its pass; a new stage starts a fresh one.
        resuming_here = self.state.den_stage == stage_idx and self.state.den_step > 0
        if not resuming_here:
            self.state.den_step = 0
        self.state.den_stage = stage_idx
        set_denoising_patch(self.dataset, stage.patch_size, self.hflip)
        self.loader = self.make_loader(self.dataset, stage.batch_size)
        if len(self.loader) == 0:
            raise ValueError(f'the training set is smaller than one denoising batch ({stage.batch_size})')
        self._iter = cycle_loader(self.loader, self.state, skip=self.state.den_step)
        self.stage_idx = stage_idx
        return True

    @property
    def stage(self) -> DenoisingStage:
        return self.stages[self.stage_idx if self.stage_idx is not None else 0]

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._iter is None:
            raise RuntimeError('DenoisingLoader.set_epoch(epoch) must be called before the first batch')
        return next(self._iter)
