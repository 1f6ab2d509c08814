#!/usr/bin/env python3
"""Joint classification-denoising training, in the manner of timm's train.py.

    timm-joint-train -c configs/quickstart.yaml           # or: python -m timm_joint.train ...
    python train_joint.py -c configs/quickstart.yaml      # the same, from a source checkout
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
        train_joint.py -c configs/cifar10_joint.yaml --data-dir /data/cifar10
    torchrun --nproc_per_node 2 train_joint.py ...        # several CPU processes (gloo)

``accelerate launch`` without those four flags (or an ``accelerate config``) first prints a warning that it
used defaults, before this script starts. The console shows the progress bars, one line per validation
and the final summary; everything, Accelerate's line for each checkpoint file included, also goes to
OUTPUT/EXPERIMENT/log.txt. On the CPU a run uses the idle cores' worth of threads (``--threads``,
``OMP_NUM_THREADS``), and says so in one line.

Two loaders over the same training set are stepped in lockstep: the classification loader (padded or
random-resized crops, flips, MixUp/CutMix, noise with sigma = sigma_max_cls * u^2) and the denoising
loader (crops without padding, flips, noise with sigma = sigma_max_den * u^2; it cycles). One forward of
``JointObjective`` computes the logits and the denoiser's output, the loss is
``CE + lambda_den * mean((D(y) - x)^2)``, and one ordinary backward follows (DESIGN §1, §2, §7).

Accelerate handles devices, mixed precision (bf16), gradient accumulation, DDP and checkpoint state;
timm gives datasets, transforms, Mixup, optimizers, schedulers, EMA and summary.csv.

The pieces, as in timm's train.py: the argument parser (a YAML config's values become the defaults of
the command line), ``build_model`` and ``create_loss_fn`` (the model and the objective's weights),
``train_one_epoch`` and ``validate``, and ``main``, which sets up the run and loops over epochs.
"""
import argparse
import copy
import functools
import gc
import itertools
import logging
import math
import shlex
import sys
import time
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, update_summary
from torch.utils.data import DataLoader
from tqdm import tqdm

from timm_joint import training
from timm_joint.cli import BAD_INPUT, check_out_dir, error_line, program_name, set_cpu_threads
from timm_joint.data import (
    check_data_dir, create_eval_dataset, create_joint_datasets, is_streamed, skip_bad_images)
from timm_joint.hub import save_pretrained
from timm_joint.io import PretrainedUnavailableError, atomic_write, check_fits, read_state_dict
from timm_joint.joint import JointDensityWrapper
from timm_joint.losses import JointLoss, JointObjective, linear_ramp
from timm_joint.noise import add_noise, from_255
from timm_joint.protocol import is_denoiser
from timm_joint.resources import find_config, packaged_configs
from timm_joint.training import (
    LOG_FILE, CheckpointManager, DenoisingLoader, DenoisingStage, DeviceLoader, NonFiniteLossError, RunLog,
    TrainState, finite_or_raise, parse_den_schedule, read_checkpoint_meta, skip_batches)

__all__ = ['main', 'cli', 'train_one_epoch', 'validate', 'build_model', 'create_loss_fn', 'check_args',
           'create_datasets', 'create_loader', 'create_optimizer_and_scheduler', 'create_accelerator',
           'export_model']

_logger = logging.getLogger('timm_joint.train')


def _optional_float(value):
    return None if str(value).lower() in ('none', 'null', '') else float(value)


# The first parser reads only the config file; its values become the defaults of the second.
config_parser = parser = argparse.ArgumentParser(description='Training Config', add_help=False)
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                    help='YAML config file specifying default arguments')

parser = argparse.ArgumentParser(description='timm-joint: joint classification-denoising training')

group = parser.add_argument_group('Dataset parameters')
group.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)')
group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
group.add_argument('--dataset', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>"): "" for an image folder, torch/cifar10, hfds/...')
group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split')
group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split')
group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='size of the train split of a streamed dataset (wds/, hfids/) that does not record it')
group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='size of the validation split of a streamed dataset that does not record it')
group.add_argument('--dataset-download', action='store_true', default=False,
                   help='allow download of the dataset for torch/ datasets')

group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default='gradresnet18_joint', type=str, metavar='MODEL',
                   help='name of the model (a gradresnet*, or any timm classifier, wrapped for joint training)')
group.add_argument('--pretrained', action='store_true', default=False, help='start with pretrained weights')
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='load these weights (an export folder or a .safetensors file) after creating the model')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='resume from this checkpoint folder (checkpoints/step_XXXXXXXX), or "auto"')
group.add_argument('--no-resume', action='store_true', default=False,
                   help='start afresh even if --experiment already holds checkpoints (refused if it does)')
group.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of label classes')
group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: model cfg)')
group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image channels')
group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='eval crop percentage')
group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='classification batch size per process')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N', help='validation batch size')
group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='gradient accumulation steps')
group.add_argument('--grad-checkpointing', action='store_true', default=False, help='non-reentrant gradient checkpointing')
group.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra model constructor arguments, e.g. side_connections=False norm_position=conv')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile (refused for joint/denoising: no double backward in aot_autograd)')

group = parser.add_argument_group('Joint objective')
group.add_argument('--task', default='joint', choices=('joint', 'classification', 'denoising'),
                   help='what to train: both heads, or one of the single-task baselines')
group.add_argument('--lambda-den', type=float, default=100.0, metavar='LAMBDA',
                   help='weight of the denoising loss (the paper adds none: 1 is its unweighted sum; 100 is this '
                        'project\'s measured departure, docs/method.md); with --lambda-den-start, its final value')
group.add_argument('--lambda-den-start', type=_optional_float, default=None, metavar='LAMBDA',
                   help='joint task: ramp the weight linearly from this value to --lambda-den over the '
                        'schedule\'s updates (--epochs, like the lr); "none" (the default) keeps --lambda-den constant')
group.add_argument('--den-reduction', default='mean', choices=('mean', 'sum'),
                   help='squared error of the denoising term per image: per-pixel mean, or sum over pixels '
                        '(the same as mean with --lambda-den C*H*W)')
group.add_argument('--den-weighting', default='none', choices=('none', 'inv_sigma2'),
                   help='denoising loss per image: plain mean, or weighted by 1/sigma^2 (epsilon prediction)')
group.add_argument('--sigma-max-cls', type=float, default=50., metavar='S',
                   help='largest noise level of the classification batch, 0-255 units (sigma = S * u^2)')
group.add_argument('--sigma-dist-cls', default='squared_uniform', choices=('squared_uniform', 'fixed'),
                   help='classification noise: sigma = S * u^2 (squared_uniform), or sigma = --sigma-max-cls for '
                        'every image (fixed: Cohen et al.\'s baseline for randomized smoothing; 0: clean)')
group.add_argument('--sigma-max-den', type=float, default=100., metavar='S',
                   help='largest noise level of the denoising batch, 0-255 units (sigma = S * u^2)')
group.add_argument('--den-batch-size', type=int, default=None, metavar='N',
                   help='denoising batch size per process (default: --batch-size)')
group.add_argument('--den-patch-size', type=int, default=None, metavar='N',
                   help='denoising crop size (default: --img-size)')
group.add_argument('--den-schedule', nargs='*', default=None, metavar='EPOCH:PATCH:BATCH',
                   help='progressive denoising patches, e.g. 0:128:32 10:160:20 20:192:12')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='optimizer (timm name)')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
group.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler')
group.add_argument('--lr', type=float, default=1e-3, metavar='LR', help='learning rate')
group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
group.add_argument('--warmup-epochs', type=int, default=0, metavar='N', help='epochs to warm up the LR')
group.add_argument('--epochs', type=int, default=100, metavar='N', help='number of epochs to train')
group.add_argument('--max-steps', type=int, default=None, metavar='N',
                   help='stop after N optimizer steps (the schedule still spans --epochs)')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')
group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr')

group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random-resized-crop scale range (large images)')
group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix when both are on')
group.add_argument('--mixup-mode', type=str, default='batch', help='"batch", "pair", or "elem"')
group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')

group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the weights')
group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
group.add_argument('--model-ema-warmup', action='store_true', help='EMA warm-up')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed')
group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
group.add_argument('--eval-interval', type=int, default=1, metavar='N', help='epochs between validations')
group.add_argument('--val-sigmas', type=float, nargs='+', default=[0, 25], metavar='S',
                   help='noise levels (0-255) of the validation top-1')
group.add_argument('--val-psnr-sigmas', type=float, nargs='+', default=[15, 25, 50], metavar='S',
                   help='noise levels (0-255) of the validation PSNR')
group.add_argument('--val-max-batches', type=int, default=None, metavar='N', help='validate on at most N batches')
group.add_argument('--checkpoint-hist', type=int, default=2, metavar='N',
                   help='number of state checkpoints to keep (at least 1)')
group.add_argument('--checkpoint-interval', type=int, default=0, metavar='N',
                   help='also save a resumable state every N optimizer steps (0: at the end of each epoch only)')
group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers per process')
group.add_argument('--cpu', action='store_true', default=False,
                   help='train on the CPU even if an accelerator is present (automatic when there is none)')
group.add_argument('--mixed-precision', default='no', choices=('no', 'bf16', 'fp16'),
                   help='Accelerate mixed precision (bf16 is the safe choice for the double backward)')
group.add_argument('--output', default='runs', type=str, metavar='PATH', help='output folder')
group.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of the train experiment')
group.add_argument('--eval-metric', default=None, type=str, metavar='EVAL_METRIC',
                   help='best-checkpoint metric (default: top1_s0, or psnr_s25 for --task denoising)')
group.add_argument('--log-with', default=None, choices=(None, 'tensorboard'), help='Accelerate tracker')
group.add_argument('--no-progress', action='store_true', default=False, help='no progress bars')
group.add_argument('--threads', type=int, default=None, metavar='N',
                   help='CPU threads per process (default: OMP_NUM_THREADS, else the idle cores: threads on busy '
                        'cores stall each other)')
group.add_argument('--skip-bad-images', action='store_true', default=False,
                   help='decode every image of an image folder once before training and leave out those that '
                        'cannot be read (counted in the log and summary.csv); without it such an image stops the run')


def _parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Two-stage parse: YAML config values become defaults, the command line overrides them."""
    args_config, remaining = config_parser.parse_known_args(argv)
    # A copy, so a config's defaults never leak into a later call in the same process.
    parser_ = copy.deepcopy(parser)
    parser_.prog = _program_name()
    if args_config.config:
        config_file = find_config(args_config.config)
        if config_file is None:
            parser_.error(f'config file {args_config.config!r} not found (packaged recipes: '
                          f'{", ".join("configs/" + n for n in packaged_configs()) or "none"})')
        with open(config_file, 'r') as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            parser_.error(f'config file {args_config.config!r} must hold a mapping of argument names to values')
        cfg.pop('command', None)  # args.yaml records the command line it came from; not an argument
        known = {a.dest for a in parser_._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser_.error(f'unknown keys in {args_config.config}: {unknown}')
        parser_.set_defaults(**cfg)
    args = parser_.parse_args(remaining)
    args.config = args_config.config
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False, sort_keys=True)
    return args, args_text


def _parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ValueError(f'--model-kwargs entries are KEY=VALUE, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = yaml.safe_load(v)
    return out


def _tasks(args: argparse.Namespace) -> Tuple[bool, bool]:
    """(use_cls, use_den): which of the two loaders and loss terms the task trains."""
    return args.task in ('joint', 'classification'), args.task in ('joint', 'denoising')


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad or contradictory options before any work starts (ValueError with what was expected)."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r}: expected a timm model name (timm.list_models()), '
                         f"e.g. {', '.join(timm.list_models('gradresnet*'))}")
    if args.task != 'classification' and args.torchcompile:
        raise ValueError('--torchcompile cannot train the joint or denoising objective: torch.compile '
                         '(aot_autograd) does not support the double backward through the input gradient')
    if args.task == 'denoising' and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax):
        raise ValueError('--mixup/--cutmix make unnatural images and only apply to the classification loader: '
                         'they contradict --task denoising')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ValueError(f'MixUp/CutMix need an even --batch-size, got {args.batch_size}')
    for name in ('sigma_max_cls', 'sigma_max_den'):
        if getattr(args, name) <= 0 and not (name == 'sigma_max_cls' and args.sigma_dist_cls == 'fixed'
                                             and args.sigma_max_cls == 0):
            raise ValueError(f'--{name.replace("_", "-")} must be > 0 (0-255 units; 0 only with --sigma-dist-cls '
                             f'fixed: clean images), got {getattr(args, name)}')
    if any(s < 0 for s in args.val_sigmas + args.val_psnr_sigmas):
        raise ValueError('--val-sigmas and --val-psnr-sigmas must be >= 0 (0-255 units)')
    if any(0 < s < 1 for s in [args.sigma_max_cls, args.sigma_max_den] + args.val_psnr_sigmas):
        _logger.warning('noise levels on the command line are in 0-255 units: did you mean sigma*255?')
    if args.lambda_den < 0 or (args.lambda_den_start is not None and args.lambda_den_start < 0):
        raise ValueError(f'--lambda-den and --lambda-den-start must be >= 0, got {args.lambda_den}, '
                         f'{args.lambda_den_start}')
    if args.checkpoint_hist < 1:
        raise ValueError(f'--checkpoint-hist must be >= 1 (the newest checkpoint is what a resume needs), '
                         f'got {args.checkpoint_hist}')
    if args.batch_size <= 0 or args.grad_accum_steps <= 0:
        raise ValueError('--batch-size and --grad-accum-steps must be positive')
    if args.eval_metric is not None:
        known = validation_metrics(args)
        if args.eval_metric not in known:
            raise ValueError(f'--eval-metric {args.eval_metric!r} is not measured by this run\'s validation: '
                             f'expected one of {", ".join(known)} (from --task, --val-sigmas, --val-psnr-sigmas'
                             f'{" and --model-ema" if args.model_ema else ""})')
    args.model_kwargs_dict = _parse_model_kwargs(args.model_kwargs)
    check_out_dir(args.output, '--output')
    if args.experiment:
        check_out_dir(Path(args.output) / args.experiment, '--experiment')
    check_data_dir(args.dataset, args.data_dir, args.dataset_download)


def validation_metrics(args: argparse.Namespace) -> List[str]:
    """The metric names a validation of this run reports (``training.validate``), EMA copies included."""
    names = []
    if args.task != 'denoising':
        names += [f'top1_s{s:g}' for s in args.val_sigmas]
    if args.task != 'classification':
        names += [f'psnr_s{s:g}' for s in args.val_psnr_sigmas]
    return names + ([f'ema_{k}' for k in names] if args.model_ema else [])


# -- model and objective ---------------------------------------------------------------------------------

def build_model(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any]]:
    """Create the model; a non-GradResNet timm classifier is wrapped for the joint/denoising tasks.

    Returns:
        (model, model_args) where model_args are the constructor arguments given; an export records them
        and, for a GradResNet, its whole architecture (``hub.save_pretrained``).
    """
    model_args = dict(args.model_kwargs_dict)
    if args.num_classes is not None:
        model_args['num_classes'] = args.num_classes
    if args.in_chans is not None:
        model_args['in_chans'] = args.in_chans
    build_args = dict(model_args, drop_rate=args.drop, drop_path_rate=args.drop_path)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **build_args)
    except TypeError as e:
        raise ValueError(f'model {args.model!r} does not accept these arguments ({e}); check --model-kwargs') from e
    except PretrainedUnavailableError as e:
        raise ValueError(f'--pretrained: {e}') from None
    if args.initial_checkpoint:
        _load_initial_checkpoint(model, args.initial_checkpoint)
    if args.task != 'classification' and not is_denoiser(model):
        model = JointDensityWrapper(model)
    return model, model_args


def create_loss_fn(args: argparse.Namespace, num_classes: Optional[int]) -> Tuple[Optional[Mixup], JointLoss]:
    """MixUp/CutMix (or None) and the joint loss ``CE + lambda_den * MSE`` with its classification term.

    The weight is ``--lambda-den``; with ``--lambda-den-start`` ``train_one_epoch`` ramps it linearly over
    the schedule's updates (``linear_ramp``).
    """
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        cls_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        cls_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        cls_loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn = JointLoss(lambda_den=args.lambda_den, cls_loss_fn=cls_loss_fn, weighting=args.den_weighting,
                        reduction=args.den_reduction)
    return mixup_fn, loss_fn


def _load_initial_checkpoint(model: nn.Module, path: str) -> None:
    """Load safetensors weights (an export folder or a safetensors file) into the model, strictly."""
    try:
        state_dict = read_state_dict(path, torch_files=False)
    except ValueError as e:
        raise ValueError(f'--initial-checkpoint: {e}') from None
    check_fits(model.state_dict(), state_dict, source=f'--initial-checkpoint {path!r}', target='model')
    model.load_state_dict(state_dict)


def create_optimizer_and_scheduler(
        args: argparse.Namespace,
        model: nn.Module,
        batches_per_epoch: int,
) -> Tuple[torch.optim.Optimizer, Any, int, int]:
    """timm's optimizer and scheduler, stepped per optimizer update.

    Returns:
        (optimizer, lr_scheduler, num_epochs, total_updates): the schedule's epochs (cooldown included)
        and its optimizer updates, which the lambda ramp spans as the lr does.
    """
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay,
        **{k: v for k, v in (('eps', args.opt_eps), ('betas', tuple(args.opt_betas) if args.opt_betas else None))
           if v is not None})
    updates_per_epoch = max(1, batches_per_epoch // args.grad_accum_steps)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    return optimizer, lr_scheduler, num_epochs, num_epochs * updates_per_epoch


# -- run setup ----------------------------------------------------------------------------------------

def _resume_point(args: argparse.Namespace, output_dir: Path,
                  ckpt: CheckpointManager) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The state folder to resume from (--resume, or the experiment's latest) and its metadata.

    Decided before anything is written, so a refused resume leaves the experiment as it was.
    """
    resume_path = None
    if args.resume and args.resume != 'auto':
        resume_path = Path(args.resume)
    elif ckpt.latest() is not None:
        if args.no_resume:
            raise ValueError(f'{output_dir} already holds checkpoints and --no-resume was given: choose another '
                             f'--experiment (nothing was overwritten)')
        resume_path = ckpt.latest()
    resume_meta = read_checkpoint_meta(resume_path) if resume_path else None
    if resume_meta is not None:
        for key in ('model', 'task'):
            if resume_meta.get(key) != getattr(args, key):
                raise ValueError(f'--resume {str(resume_path)!r} was trained with {key}={resume_meta.get(key)!r}, '
                                 f'not {getattr(args, key)!r}: it does not fit this run (nothing was overwritten)')
    return resume_path, resume_meta


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, 'mps', None)
    xpu = getattr(torch, 'xpu', None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def create_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    """Accelerate: device, mixed precision, gradient accumulation, DDP options, seeded samplers, trackers."""
    # Unused parameters exist only when one head is not trained (a single task).
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=args.task != 'joint')
    return Accelerator(
        # Accelerate recognises several CPU processes (torchrun, gloo) only with cpu=True.
        cpu=args.cpu or not _has_accelerator(),
        mixed_precision=args.mixed_precision,
        # The denoising loader cycles: its end must not force a gradient sync (DESIGN §2).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.grad_accum_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[ddp_kwargs],
        # --torchcompile (classification only, check_args): Accelerate compiles the prepared model.
        **({'dynamo_backend': args.torchcompile} if args.torchcompile else {}),
        log_with=args.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / 'logs')),
    )


def create_datasets(
        args: argparse.Namespace,
        img_size: int,
        crop_pct: float,
        den_stage: DenoisingStage,
        num_classes: Optional[int],
) -> Tuple[Any, Any, Any]:
    """The classification and denoising views of the training split (each sample's noise drawn in the
    loader workers) and the validation split; refuses labels the model has no class for.

    Returns:
        (ds_cls, ds_den, ds_eval)
    """
    ds_cls, ds_den = create_joint_datasets(
        args.dataset, args.data_dir, img_size=img_size, patch_size=den_stage.patch_size,
        split=args.train_split, download=args.dataset_download, hflip=args.hflip, scale=args.scale,
        seed=args.seed, batch_size=args.batch_size, den_batch_size=den_stage.batch_size,
        num_samples=args.train_num_samples,  # the loader workers draw each sample's training noise too
        sigma_max_cls=from_255(args.sigma_max_cls), sigma_max_den=from_255(args.sigma_max_den),
        sigma_dist_cls=args.sigma_dist_cls)
    ds_eval = create_eval_dataset(args.dataset, args.data_dir, img_size=img_size, split=args.val_split,
                                  download=args.dataset_download, crop_pct=crop_pct,
                                  batch_size=args.validation_batch_size or args.batch_size,
                                  num_samples=args.val_num_samples)
    targets_max = _max_target(ds_cls)
    if args.task != 'denoising' and targets_max is not None and num_classes and targets_max >= num_classes:
        raise ValueError(f'the dataset has labels up to {targets_max} but the model has num_classes={num_classes}: '
                         f'set --num-classes {targets_max + 1}')
    return ds_cls, ds_den, ds_eval


def create_loader(
        dataset,
        batch_size: int,
        accelerator: Accelerator,
        *,
        shuffle: bool,
        drop_last: bool,
        workers: int,
        streamed: bool,
        prepare: bool = False,
):
    """A DataLoader for ``accelerator.prepare``, or for a stream (split by timm's reader) a ``DeviceLoader``
    that only moves batches to the device. With ``prepare``, the loader comes back ready for the device."""
    if streamed:
        dataset.set_loader_cfg(num_workers=workers)
        return DeviceLoader(DataLoader(
            dataset, batch_size=batch_size, drop_last=drop_last, num_workers=workers,
            pin_memory=torch.cuda.is_available(), generator=dataset.generator), accelerator.device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                        num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)
    return accelerator.prepare(loader) if prepare else loader


def _max_target(ds) -> Optional[int]:
    """Largest label in an image-folder dataset, without loading images (None if unknown)."""
    reader = getattr(getattr(ds, 'dataset', None), 'reader', None)
    samples = getattr(reader, 'samples', None)
    if samples:
        return max(int(t) for _, t in samples)
    class_to_idx = getattr(reader, 'class_to_idx', None)  # streamed readers that know their classes
    if class_to_idx:
        return max(int(v) for v in class_to_idx.values())
    targets = getattr(getattr(ds, 'dataset', None), 'targets', None)
    if targets is not None and len(targets):
        return int(max(targets))
    return None


def _log_skipped(split: str, checked: int, bad: Sequence[Tuple[str, str]]) -> None:
    """--skip-bad-images: one line on the console (and in log.txt), every file left out in log.txt."""
    name = {'train': 'training', 'val': 'validation'}[split]
    if not bad:
        _logger.info(f'--skip-bad-images: all {checked} {name} images can be read')
        return
    _logger.warning(f'--skip-bad-images: left out {len(bad)} of {checked} {name} images that cannot be read, '
                    f'e.g. {bad[0][0]} ({bad[0][1]}); each is listed in log.txt')
    for path, why in bad:
        _logger.info(f'left out {path}: {why}', extra={'file_only': True})


def _write_args(args: argparse.Namespace, output_dir: Path, argv: Optional[Sequence[str]]) -> None:
    """runs/NAME/args.yaml: the arguments and the command line (kept from the first run of an experiment)."""
    args_file = output_dir / 'args.yaml'
    if args_file.exists():
        return
    record = {k: v for k, v in vars(args).items() if k != 'model_kwargs_dict'}
    record['command'] = ' '.join(shlex.quote(a) for a in [_program_name()] + list(
        argv if argv is not None else sys.argv[1:]))
    atomic_write(args_file, yaml.safe_dump(record, sort_keys=True))


def _program_name() -> str:
    """How this run was started, as a user would type it again (``timm_joint.cli.program_name``)."""
    return program_name('timm_joint.train')


def export_model(
        net: nn.Module,
        folder: Path,
        args: argparse.Namespace,
        *,
        model_args: Dict[str, Any],
        img_size: int,
        crop_pct: float,
        num_updates: int,
) -> None:
    """Write ``folder`` (model.safetensors and timm's config.json) for ``timm.create_model('local-dir:...')``.

    The config records the constructor arguments and the objective, and states the training size and
    pixel range, so a reload is exact and timm's data pipeline feeds what the model saw.
    """
    cfg_out = dict(getattr(net, 'pretrained_cfg', {}) or {})
    # The export evaluates at the size it was trained at (a timm classifier's cfg says 224).
    n_chans = int(cfg_out.get('input_size', (3,))[0])
    cfg_out.update(input_size=(n_chans, img_size, img_size), crop_pct=crop_pct)
    cfg_out.pop('test_input_size', None)
    if not is_denoiser(net):
        # A plain timm classifier was trained on raw [0, 1] pixels: say so in its config, so timm's
        # data pipeline does not normalise what it never saw normalised.
        n = len(cfg_out.get('mean', (0., 0., 0.)))
        cfg_out.update(mean=(0.,) * n, std=(1.,) * n)
    save_pretrained(net, folder, model_name=args.model, model_args=model_args, pretrained_cfg=cfg_out,
                    extra_config={'timm_joint': {
                        'task': args.task, 'wrapper': isinstance(net, JointDensityWrapper),
                        'sigma_max_cls_255': args.sigma_max_cls, 'sigma_max_den_255': args.sigma_max_den,
                        'sigma_dist_cls': args.sigma_dist_cls,
                        'lambda_den': args.lambda_den, 'lambda_den_start': args.lambda_den_start,
                        'num_updates': num_updates}})


def _export_epoch(export: Callable, folder: Path, model: nn.Module, model_ema: Optional[ModelEmaV3],
                  state: TrainState, epoch: int, metric: Optional[float]) -> None:
    """Export ``last`` (and ``ema_last``) after a validation, and ``best`` (``ema_best``) when ``metric`` (the
    model's ``--eval-metric``; higher is better) beats the best so far."""
    export(model, folder / 'last', num_updates=state.num_updates)
    if model_ema is not None:
        export(model_ema.module, folder / 'ema_last', num_updates=state.num_updates)
    if metric is not None and (state.best_metric is None or metric > state.best_metric):
        state.best_metric, state.best_epoch = metric, epoch
        export(model, folder / 'best', num_updates=state.num_updates)
        if model_ema is not None:
            export(model_ema.module, folder / 'ema_best', num_updates=state.num_updates)


def _save_state(ckpt: CheckpointManager, accelerator: Accelerator, args: argparse.Namespace, state: TrainState,
                stream_readers: Optional[int]) -> None:
    """A resumable state folder (every process calls this: Accelerate writes one RNG file per rank)."""
    meta = dict(model=args.model, task=args.task, epoch=state.epoch, step_in_epoch=state.step_in_epoch,
                num_updates=state.num_updates, den_epoch=state.den_epoch, den_step=state.den_step)
    if stream_readers is not None:
        meta['stream_readers'] = stream_readers
    ckpt.save(accelerator, state.num_updates, meta)


# -- one epoch, validation ----------------------------------------------------------------------------

def train_one_epoch(
        epoch: int,
        objective: nn.Module,
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        loss_fn: JointLoss,
        args: argparse.Namespace,
        accelerator: Accelerator,
        state: TrainState,
        *,
        lr_scheduler,
        num_batches: int,
        total_updates: int,
        den_loader: Optional[DenoisingLoader] = None,
        mixup_fn: Optional[Mixup] = None,
        model_ema: Optional[ModelEmaV3] = None,
        save_state: Optional[Callable[[], None]] = None,
) -> Tuple[Dict[str, float], bool]:
    """Train on the rest of one epoch (from ``state.step_in_epoch``), or until ``--max-steps``.

    Args:
        epoch: The epoch (``state.epoch``).
        objective: The prepared ``JointObjective``.
        loader: This epoch's remaining batches (x, target, index, sigma, eps): the classification
            loader's, or, for ``--task denoising``, the denoising ones.
        optimizer: The prepared optimizer.
        loss_fn: The joint loss; its ``lambda_den`` follows the ramp when ``--lambda-den-start`` is set.
        args: The run's arguments.
        accelerator: The run's Accelerator.
        state: Counters, advanced here (batches, optimizer updates).
        lr_scheduler: timm scheduler, stepped per update.
        num_batches: Batches in the full epoch (progress and log lines).
        total_updates: Updates of the whole schedule (the lambda ramp spans it, as the lr does).
        den_loader: For the joint task, the denoising batches, stepped in lockstep with ``loader``.
        mixup_fn: MixUp/CutMix of the classification batch, or None.
        model_ema: EMA of the weights, updated after every optimizer step, or None.
        save_state: Writes a resumable state (every ``--checkpoint-interval`` updates).

    Returns:
        (the epoch's mean training terms: loss, loss_cls, loss_den, lambda_den; whether to stop)
    """
    use_cls, use_den = _tasks(args)
    model = accelerator.unwrap_model(objective).model
    show = accelerator.is_main_process and not args.no_progress
    objective.train()
    meters: Dict[str, float] = OrderedDict()
    t0, n_seen, n_steps, stop = time.time(), 0, 0, False
    pbar = tqdm(total=num_batches, initial=state.step_in_epoch, desc=f'epoch {epoch}', disable=not show,
                leave=False)
    for batch in loader:
        with accelerator.accumulate(objective):
            y_cls = y_den = target = x_den = sigma_den = None
            # Each sample's noise (sigma, eps) was drawn in the loader, seeded by (seed, loader, epoch,
            # sample): y = x + sigma * eps, after MixUp for the classification batch.
            if use_cls:
                x, target, _, sigma_cls, eps_cls = batch
                if mixup_fn is not None:
                    # Seeded per (rank, epoch, batch): one mix per batch (timm's Mixup draws from numpy's global
                    # generator), so that a resume draws what the uninterrupted run drew.
                    np.random.seed(hash((args.seed, accelerator.process_index, epoch,
                                         state.step_in_epoch)) % 2 ** 32)
                    x, target = mixup_fn(x, target)
                y_cls = add_noise(x, sigma_cls, eps_cls)
            if use_den:
                x_den, _, _, sigma_den, eps_den = next(den_loader) if use_cls else batch
                y_den = add_noise(x_den, sigma_den, eps_den)
            if args.lambda_den_start is not None and use_cls and use_den:
                loss_fn.lambda_den = linear_ramp(args.lambda_den_start, args.lambda_den,
                                                 state.num_updates, total_updates)
            with accelerator.autocast():
                out = objective(y_cls, y_den, sigma_den)
            terms = loss_fn(out, target, x_den, sigma_den)
            finite_or_raise(terms['loss'], accelerator, state.num_updates + 1)
            accelerator.backward(terms['loss'])
            if accelerator.sync_gradients and args.clip_grad:
                accelerator.clip_grad_norm_(objective.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.step_in_epoch += 1
        n_seen += (y_cls if y_cls is not None else y_den).shape[0]
        n_steps += 1
        for k, v in terms.items():
            meters[k] = meters.get(k, 0.) + float(v.detach())
        if use_cls and use_den:
            meters['lambda_den'] = meters.get('lambda_den', 0.) + loss_fn.lambda_den
        if accelerator.sync_gradients:
            state.num_updates += 1
            lr_scheduler.step_update(num_updates=state.num_updates)
            if model_ema is not None:
                model_ema.update(model, step=state.num_updates)
            if args.checkpoint_interval and state.num_updates % args.checkpoint_interval == 0 and save_state:
                save_state()
            if args.max_steps and state.num_updates >= args.max_steps:
                stop = True
        pbar.update(1)
        if state.step_in_epoch % args.log_interval == 0 or stop:
            avg = {k: v / n_steps for k, v in meters.items()}
            lr = optimizer.param_groups[0]['lr']
            msg = ' '.join(f'{k} {v:.4g}' for k, v in avg.items())
            if show:
                pbar.set_postfix_str(msg)
            elif accelerator.is_main_process:
                _logger.info(f'epoch {epoch} [{state.step_in_epoch}/{num_batches}] {msg} lr {lr:.3g} '
                             f'{n_seen * accelerator.num_processes / (time.time() - t0):.1f} img/s')
        if stop:
            break
    pbar.close()
    return OrderedDict((k, v / max(1, n_steps)) for k, v in meters.items()), stop


def validate(
        model: nn.Module,
        loader,
        accelerator: Accelerator,
        args: argparse.Namespace,
        *,
        model_ema: Optional[ModelEmaV3] = None,
) -> Dict[str, float]:
    """Top-1 at ``--val-sigmas`` and blind PSNR at ``--val-psnr-sigmas`` of the model (and of its EMA,
    as ``ema_*``), on at most ``--val-max-batches`` batches; the model is left in training mode.

    Returns:
        {'top1_s0': %, ..., 'psnr_s25': dB, ..., 'num_images': n, 'ema_top1_s0': ..., ...}
    """
    use_cls, use_den = _tasks(args)
    kwargs = dict(acc_sigmas_255=args.val_sigmas, psnr_sigmas_255=args.val_psnr_sigmas, seed=args.seed,
                  do_cls=use_cls, do_den=use_den, progress=not args.no_progress,
                  streamed=isinstance(loader, DeviceLoader))
    if args.val_max_batches:
        loader = list(itertools.islice(loader, args.val_max_batches))
    metrics = training.validate(model, loader, accelerator, **kwargs)
    if model_ema is not None:
        metrics.update({f'ema_{k}': v for k, v in training.validate(model_ema.module, loader, accelerator,
                                                                    **kwargs).items()
                        if k != 'num_images'})
    model.train()
    return metrics


# -- main -----------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Train as the command line (and its YAML config) says; returns the experiment folder.

    The console shows the progress bars, this package's lines (the model, each validation, the summary)
    and warnings; everything, Accelerate's checkpoint lines included, also goes to OUTPUT/EXPERIMENT/log.txt
    (``training.RunLog``).

    Raises:
        ValueError: bad options, data or a checkpoint that does not fit, before any work or write.
        SystemExit: (status 2) the loss became non-finite; the last good checkpoint and exports are kept.
    """
    run_log = RunLog()
    try:
        return _train(argv, run_log)
    finally:
        run_log.close()


def _train(argv: Optional[Sequence[str]], run_log: RunLog) -> Path:
    """``main``'s body, with its log set up."""
    args, _ = _parse_args(argv)
    check_args(args)
    use_cls, use_den = _tasks(args)

    # -- output folder and resume decision (before any write) --------------------------------------
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, args.task])
    output_dir = Path(args.output) / exp_name
    ckpt = CheckpointManager(output_dir / 'checkpoints', keep=args.checkpoint_hist)
    resume_path, resume_meta = _resume_point(args, output_dir, ckpt)

    accelerator = create_accelerator(args, output_dir)
    set_seed(args.seed)
    is_main = accelerator.is_main_process
    if not is_main:
        run_log.quiet()
    cpu_threads = set_cpu_threads(args.threads) if accelerator.device.type == 'cpu' else None
    streamed = is_streamed(args.dataset)
    # A stream's order depends on how many readers split it (ranks x loader workers): a mid-epoch resume
    # with another number would skip the wrong batches.
    stream_readers = accelerator.num_processes * max(1, args.workers) if streamed else None
    if resume_meta is not None and streamed and resume_meta.get('stream_readers', stream_readers) != stream_readers:
        raise ValueError(f'--resume {str(resume_path)!r} read the stream with {resume_meta["stream_readers"]} readers '
                         f'(processes x loader workers), this run with {stream_readers}: resume with the same number '
                         f'of processes and -j/--workers (nothing was overwritten)')

    # -- model, data ---------------------------------------------------------------------------------
    model, model_args = build_model(args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    img_size = args.img_size or int(cfg.get('input_size', (3, 224, 224))[-1])
    crop_pct = args.crop_pct or cfg.get('crop_pct', 1.0)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f'Model {args.model} ({type(model).__name__}) created, {n_params / 1e6:.3f}M parameters, '
                     f'task {args.task}, {accelerator.num_processes} process(es) on {accelerator.device}')
        if cpu_threads is not None:
            _logger.info(f'CPU threads: {cpu_threads[0]} per process ({cpu_threads[1]})')

    den_stages = parse_den_schedule(args.den_schedule, args.den_patch_size or img_size,
                                    args.den_batch_size or args.batch_size)
    num_classes = getattr(model, 'num_classes', None)
    ds_cls, ds_den, ds_eval = create_datasets(args, img_size, crop_pct, den_stages[0], num_classes)
    skipped: Dict[str, int] = {}
    if args.skip_bad_images:  # the denoising view shares the training view's file list
        for split, ds in (('train', ds_cls), ('val', ds_eval)):
            checked, bad = skip_bad_images(ds, workers=max(1, args.workers))
            skipped[split] = len(bad)
            if is_main:
                _log_skipped(split, checked, bad)

    make_loader = functools.partial(create_loader, accelerator=accelerator, workers=args.workers, streamed=streamed)
    loader_cls = make_loader(ds_cls, args.batch_size, shuffle=True, drop_last=True) if use_cls else None
    loader_eval = make_loader(ds_eval, args.validation_batch_size or args.batch_size, shuffle=False, drop_last=False)
    mixup_fn, loss_fn = create_loss_fn(args, num_classes)

    # -- optimizer, schedule, EMA, state --------------------------------------------------------------
    objective = JointObjective(model, args.task)
    if use_cls:
        # Per process: Accelerate shards a map-style loader over the processes (a stream is split already).
        n_batches = len(loader_cls) if streamed else math.ceil(len(loader_cls) / accelerator.num_processes)
    else:  # batches per process in one pass of the denoising loader (a stream's length is per process already)
        n_batches = math.ceil(len(ds_den) / (den_stages[0].batch_size * (1 if streamed else accelerator.num_processes)))
    if n_batches == 0:
        raise ValueError(f'the training set ({len(ds_cls)} images) is smaller than one batch ({args.batch_size})')
    optimizer, lr_scheduler, num_epochs, total_updates = create_optimizer_and_scheduler(args, model, n_batches)

    # The order of prepare() calls is the order of the loaders in Accelerate's state folders: keep it.
    objective, optimizer = accelerator.prepare(objective, optimizer)
    prepare = (lambda loader: loader) if streamed else accelerator.prepare
    loader_eval = prepare(loader_eval)
    if loader_cls is not None:
        loader_cls = prepare(loader_cls)
    model = accelerator.unwrap_model(objective).model
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device=accelerator.device)
        accelerator.register_for_checkpointing(model_ema)
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler)
    accelerator.register_for_checkpointing(state)

    if resume_path is not None:
        try:
            accelerator.load_state(str(resume_path))
        except Exception as e:  # a mismatched or corrupt state: refuse, write nothing
            raise ValueError(f'--resume {str(resume_path)!r} does not fit this model/optimizer or is corrupt: '
                             f'{type(e).__name__}: {e} (nothing was overwritten)') from e
        if is_main:
            _logger.info(f'Resumed from {resume_path} at epoch {state.epoch}, batch {state.step_in_epoch}, '
                         f'update {state.num_updates}')
    log_path = output_dir / LOG_FILE
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        run_log.open(output_dir)
        _write_args(args, output_dir, argv)
    if args.log_with:
        accelerator.init_trackers(exp_name)

    # The denoising loader is built (and prepared) at its first epoch, after the resume: its stage and
    # position come from the restored state.
    den_loader = None
    if use_den:
        den_loader = DenoisingLoader(
            ds_den, den_stages, state, hflip=args.hflip,
            make_loader=lambda ds, batch_size: make_loader(ds, batch_size, shuffle=True, drop_last=True,
                                                           prepare=True))
    eval_metric = args.eval_metric or ('psnr_s25' if args.task == 'denoising' else 'top1_s0')
    summary_file = output_dir / 'summary.csv'
    export = functools.partial(export_model, args=args, model_args=model_args, img_size=img_size,
                               crop_pct=crop_pct)
    save_state = functools.partial(_save_state, ckpt, accelerator, args, state, stream_readers)

    # -- training ------------------------------------------------------------------------------------
    stop = False
    try:
        while state.epoch < num_epochs and not stop:
            epoch = state.epoch
            if den_loader is not None and den_loader.set_epoch(epoch) and is_main and len(den_stages) > 1:
                _logger.info(f'Denoising stage {den_loader.stage_idx}: patches {den_loader.stage.patch_size}px, '
                             f'batch {den_loader.stage.batch_size}')
            if use_cls:
                loader_cls.set_epoch(epoch)
                ds_cls.set_epoch(epoch)
                batches = skip_batches(loader_cls, state.step_in_epoch) if state.step_in_epoch else loader_cls
                num_batches = len(loader_cls)
            else:  # --task denoising: an epoch is one pass over the denoising loader's batches
                batches = (next(den_loader) for _ in range(n_batches - state.step_in_epoch))
                num_batches = n_batches
            train_metrics, stop = train_one_epoch(
                epoch, objective, batches, optimizer, loss_fn, args, accelerator, state,
                lr_scheduler=lr_scheduler, num_batches=num_batches, total_updates=total_updates,
                den_loader=den_loader if use_cls else None, mixup_fn=mixup_fn, model_ema=model_ema,
                save_state=save_state)

            epoch_done = not stop or state.step_in_epoch >= num_batches
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            last = stop or state.epoch >= num_epochs
            if last or (epoch_done and state.epoch % args.eval_interval == 0):
                eval_metrics = validate(model, loader_eval, accelerator, args, model_ema=model_ema)
                eval_metrics.update({f'skipped_{split}_images': n for split, n in skipped.items()})
                if is_main:
                    _logger.info(f'epoch {epoch} update {state.num_updates}: ' +
                                 ' '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items()))
                    update_summary(epoch, train_metrics, eval_metrics, filename=str(summary_file),
                                   lr=optimizer.param_groups[0]['lr'], write_header=not summary_file.exists())
                    if args.log_with:
                        accelerator.log({**{f'train/{k}': v for k, v in train_metrics.items()},
                                         **{f'eval/{k}': v for k, v in eval_metrics.items()}},
                                        step=state.num_updates)
                    _export_epoch(export, output_dir / 'export', model, model_ema, state, epoch,
                                  eval_metrics.get(eval_metric))
            save_state()
        if is_main:
            if state.best_metric is not None:
                _logger.info(f'*** Best {eval_metric}: {state.best_metric:.4g} (epoch {state.best_epoch})')
            _logger.info(f'Outputs in {output_dir} (log: {log_path})')
    except NonFiniteLossError as e:
        if is_main:
            _logger.error(str(e))
        raise SystemExit(2) from None
    finally:
        # Tear down in this order: with end_training() alone gloo aborted at exit in 8 of 20 runs here.
        del objective, optimizer, loader_cls, den_loader, loader_eval, model_ema, model
        gc.collect()
        accelerator.end_training()
    return output_dir


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``timm-joint-train``, ``python -m timm_joint.train``, ``train_joint.py``).

    Bad input exits with status 2 and one error line instead of a traceback.
    """
    try:
        main(argv)
    except BAD_INPUT as e:
        print(error_line('timm_joint.train', e), file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
