#!/usr/bin/env python3
"""Joint classification-denoising training, in the manner of timm's train.py.

    python train_joint.py -c configs/quickstart.yaml
    accelerate launch train_joint.py -c configs/cifar10_joint.yaml --data-dir /data/cifar10
    torchrun --nproc_per_node 2 train_joint.py ...      # several CPU processes (gloo)

Two loaders over the same training set are stepped in lockstep: the classification loader (padded or
random-resized crops, flips, MixUp/CutMix, noise with sigma = sigma_max_cls * u^2) and the denoising
loader (crops without padding, flips, noise with sigma = sigma_max_den * u^2; it cycles). One forward of
``JointObjective`` computes the logits and the denoiser's output, the loss is
``CE + lambda_den * mean((D(y) - x)^2)``, and one ordinary backward follows (DESIGN §1, §2, §7).

Accelerate handles devices, mixed precision (bf16), gradient accumulation, DDP and checkpoint state;
timm gives datasets, transforms, Mixup, optimizers, schedulers, EMA and summary.csv.
"""
import argparse
import copy
import gc
import logging
import math
import os
import shlex
import sys
import time
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

_logger = logging.getLogger('train_joint')

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
                   help='extra model constructor arguments, e.g. side_energy=False norm_position=conv')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile (refused for joint/denoising: no double backward in aot_autograd)')

group = parser.add_argument_group('Joint objective')
group.add_argument('--task', default='joint', choices=('joint', 'classification', 'denoising'),
                   help='what to train: both heads, or one of the single-task baselines')
group.add_argument('--lambda-den', type=float, default=200.0, metavar='LAMBDA',
                   help='weight of the denoising loss at the end of the schedule (default from the measured '
                        'sweep in the README)')
group.add_argument('--lambda-den-start', type=_optional_float, default=10.0, metavar='LAMBDA',
                   help='joint task: the weight ramps linearly from this value to --lambda-den over the '
                        'schedule\'s updates (--epochs, like the lr); "none" for a constant --lambda-den')
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
group.add_argument('--checkpoint-hist', type=int, default=2, metavar='N', help='number of state checkpoints to keep')
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


def _parse_args(argv=None):
    """Two-stage parse: YAML config values become defaults, the command line overrides them."""
    args_config, remaining = config_parser.parse_known_args(argv)
    # A copy, so a config's defaults never leak into a later call in the same process.
    parser_ = copy.deepcopy(parser)
    if args_config.config:
        if not os.path.isfile(args_config.config):
            parser_.error(f'config file {args_config.config!r} not found')
        with open(args_config.config, 'r') as f:
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


def _parse_model_kwargs(items):
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ValueError(f'--model-kwargs entries are KEY=VALUE, got {item!r}')
        k, v = item.split('=', 1)
        out[k] = yaml.safe_load(v)
    return out


def check_args(args) -> None:
    """Refuse bad or contradictory options before any work starts (ValueError with what was expected)."""
    import timm
    import timm_joint  # noqa: F401  (registers the GradResNet names)
    from timm_joint.data import check_data_dir

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
    if args.batch_size <= 0 or args.grad_accum_steps <= 0:
        raise ValueError('--batch-size and --grad-accum-steps must be positive')
    args.model_kwargs_dict = _parse_model_kwargs(args.model_kwargs)
    check_data_dir(args.dataset, args.data_dir, args.dataset_download)


def build_model(args):
    """Create the model; a non-GradResNet timm classifier is wrapped for the joint/denoising tasks.

    Returns:
        (model, model_args) where model_args are the constructor arguments an export records.
    """
    import timm
    from timm_joint import JointDensityWrapper

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
    if args.initial_checkpoint:
        _load_initial_checkpoint(model, args.initial_checkpoint)
    from timm_joint.models.gradresnet import GradResNet
    if isinstance(model, GradResNet):
        # Exports name the biases explicitly, so they load whatever GradResNet's defaults become.
        norms = [m for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
        model_args.setdefault('bias', model.stem[0].bias is not None)
        model_args.setdefault('norm_bias', any(m.bias is not None for m in norms))
    if args.task != 'classification' and not hasattr(model, 'denoise'):
        model = JointDensityWrapper(model)
    return model, model_args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args, _ = _parse_args(argv)
    check_args(args)

    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, update_summary
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from timm_joint.data import create_eval_dataset, create_joint_datasets, is_streamed, set_denoising_patch
    from timm_joint.hub import save_pretrained
    from timm_joint.losses import JointLoss, JointObjective, linear_ramp
    from timm_joint.noise import add_noise, from_255
    from timm_joint.training import (
        CheckpointManager, DeviceLoader, NonFiniteLossError, TrainState, cycle_loader, finite_or_raise,
        parse_den_schedule, read_checkpoint_meta, skip_batches, stage_for_epoch, validate)

    # -- output folder and resume decision (before any write) --------------------------------------
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, args.task])
    output_dir = Path(args.output) / exp_name
    ckpt = CheckpointManager(output_dir / 'checkpoints', keep=args.checkpoint_hist)
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

    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=args.task != 'joint')
    accelerator = Accelerator(
        # Accelerate recognises several CPU processes (torchrun, gloo) only with cpu=True.
        cpu=args.cpu or not _has_accelerator(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.grad_accum_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[ddp_kwargs],
        log_with=args.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / 'logs')),
    )
    set_seed(args.seed)
    is_main = accelerator.is_main_process
    streamed = is_streamed(args.dataset)
    # A stream's order depends on how many readers split it (ranks x loader workers): a mid-epoch resume
    # with another number would skip the wrong batches.
    stream_readers = accelerator.num_processes * max(1, args.workers) if streamed else None
    if resume_meta is not None and streamed and resume_meta.get('stream_readers', stream_readers) != stream_readers:
        raise ValueError(f'--resume {str(resume_path)!r} read the stream with {resume_meta["stream_readers"]} readers '
                         f'(processes x loader workers), this run with {stream_readers}: resume with the same number '
                         f'of processes and -j/--workers (nothing was overwritten)')
    show = is_main and not args.no_progress

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

    den_stages = parse_den_schedule(args.den_schedule, args.den_patch_size or img_size,
                                    args.den_batch_size or args.batch_size)
    ds_cls, ds_den = create_joint_datasets(
        args.dataset, args.data_dir, img_size=img_size, patch_size=den_stages[0].patch_size,
        split=args.train_split, download=args.dataset_download, hflip=args.hflip, scale=args.scale,
        seed=args.seed, batch_size=args.batch_size, den_batch_size=den_stages[0].batch_size,
        num_samples=args.train_num_samples,  # the loader workers draw each sample's training noise too
        sigma_max_cls=from_255(args.sigma_max_cls), sigma_max_den=from_255(args.sigma_max_den),
        sigma_dist_cls=args.sigma_dist_cls)
    ds_eval = create_eval_dataset(args.dataset, args.data_dir, img_size=img_size, split=args.val_split,
                                  download=args.dataset_download, crop_pct=crop_pct,
                                  batch_size=args.validation_batch_size or args.batch_size,
                                  num_samples=args.val_num_samples)
    num_classes = getattr(model, 'num_classes', None)
    targets_max = _max_target(ds_cls)
    if args.task != 'denoising' and targets_max is not None and num_classes and targets_max >= num_classes:
        raise ValueError(f'the dataset has labels up to {targets_max} but the model has num_classes={num_classes}: '
                         f'set --num-classes {targets_max + 1}')

    def make_loader(ds, batch_size, shuffle, drop_last):
        """A loader for accelerator.prepare, or for a stream (split by timm's reader) one that only moves
        batches to the device."""
        if streamed:
            ds.set_loader_cfg(num_workers=args.workers)
            return DeviceLoader(DataLoader(
                ds, batch_size=batch_size, drop_last=drop_last, num_workers=args.workers,
                pin_memory=torch.cuda.is_available(), generator=ds.generator), accelerator.device)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)

    def prepare_loader(loader):
        return loader if streamed else accelerator.prepare(loader)

    use_cls = args.task in ('joint', 'classification')
    use_den = args.task in ('joint', 'denoising')
    loader_cls = make_loader(ds_cls, args.batch_size, True, True) if use_cls else None
    loader_eval = make_loader(ds_eval, args.validation_batch_size or args.batch_size, False, False)

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
    loss_fn = JointLoss(lambda_den=args.lambda_den, cls_loss_fn=cls_loss_fn, weighting=args.den_weighting)

    # -- optimizer, schedule, EMA, state --------------------------------------------------------------
    objective = JointObjective(model, args.task)
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay,
        **{k: v for k, v in (('eps', args.opt_eps), ('betas', tuple(args.opt_betas) if args.opt_betas else None))
           if v is not None})
    if use_cls:
        n_batches = len(loader_cls)
    else:  # batches per process in one pass of the denoising loader (a stream's length is per process already)
        n_batches = math.ceil(len(ds_den) / (den_stages[0].batch_size * (1 if streamed else accelerator.num_processes)))
    if n_batches == 0:
        raise ValueError(f'the training set ({len(ds_cls)} images) is smaller than one batch ({args.batch_size})')
    updates_per_epoch = max(1, n_batches // args.grad_accum_steps)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    total_updates = num_epochs * updates_per_epoch  # the lambda ramp spans the schedule, as the lr does

    objective, optimizer = accelerator.prepare(objective, optimizer)
    loader_eval = prepare_loader(loader_eval)
    if loader_cls is not None:
        loader_cls = prepare_loader(loader_cls)
    model_unwrapped = accelerator.unwrap_model(objective).model
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model_unwrapped, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
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

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        args_file = output_dir / 'args.yaml'
        if not args_file.exists():
            record = {k: v for k, v in vars(args).items() if k != 'model_kwargs_dict'}
            record['command'] = ' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + list(
                argv if argv is not None else sys.argv[1:]))
            tmp = args_file.with_suffix('.yaml.tmp')
            tmp.write_text(yaml.safe_dump(record, sort_keys=True))
            os.replace(tmp, args_file)
    if args.log_with:
        accelerator.init_trackers(exp_name)

    # -- denoising loader (rebuilt when the patch schedule changes stage) ------------------------------
    loader_den, den_iter, den_stage_idx = None, None, None

    def ensure_den_loader(epoch):
        nonlocal loader_den, den_iter, den_stage_idx
        stage_idx = stage_for_epoch(den_stages, epoch)
        if loader_den is not None and stage_idx == den_stage_idx:
            return
        stage = den_stages[stage_idx]
        resuming_here = state.den_stage == stage_idx and state.den_step > 0
        if not resuming_here and den_stage_idx is not None:
            state.den_step = 0
        state.den_stage = stage_idx
        set_denoising_patch(ds_den, stage.patch_size, args.hflip)
        loader_den = prepare_loader(make_loader(ds_den, stage.batch_size, True, True))
        if len(loader_den) == 0:
            raise ValueError(f'the training set is smaller than one denoising batch ({stage.batch_size})')
        den_iter = cycle_loader(loader_den, state, skip=state.den_step)
        den_stage_idx = stage_idx
        if is_main and len(den_stages) > 1:
            _logger.info(f'Denoising stage {stage_idx}: patches {stage.patch_size}px, batch {stage.batch_size}')

    eval_metric = args.eval_metric or ('psnr_s25' if args.task == 'denoising' else 'top1_s0')
    summary_file = output_dir / 'summary.csv'

    def export(name, net):
        if is_main:
            cfg_out = dict(getattr(net, 'pretrained_cfg', {}) or {})
            # The export evaluates at the size it was trained at (a timm classifier's cfg says 224).
            n_chans = int(cfg_out.get('input_size', (3,))[0])
            cfg_out.update(input_size=(n_chans, img_size, img_size), crop_pct=crop_pct)
            cfg_out.pop('test_input_size', None)
            if not hasattr(net, 'denoise'):
                # A plain timm classifier was trained on raw [0, 1] pixels: say so in its config, so timm's
                # data pipeline does not normalise what it never saw normalised.
                n = len(cfg_out.get('mean', (0., 0., 0.)))
                cfg_out.update(mean=(0.,) * n, std=(1.,) * n)
            save_pretrained(net, output_dir / 'export' / name, model_name=args.model, model_args=model_args,
                            pretrained_cfg=cfg_out,
                            extra_config={'timm_joint': {
                                'task': args.task, 'wrapper': type(net).__name__ == 'JointDensityWrapper',
                                'sigma_max_cls_255': args.sigma_max_cls, 'sigma_max_den_255': args.sigma_max_den,
                                'sigma_dist_cls': args.sigma_dist_cls,
                                'lambda_den': args.lambda_den, 'lambda_den_start': args.lambda_den_start,
                                'num_updates': state.num_updates}})

    def save_state():
        meta = dict(model=args.model, task=args.task, epoch=state.epoch, step_in_epoch=state.step_in_epoch,
                    num_updates=state.num_updates, den_epoch=state.den_epoch, den_step=state.den_step)
        if stream_readers is not None:
            meta['stream_readers'] = stream_readers
        ckpt.save(accelerator, state.num_updates, meta)

    # -- training ------------------------------------------------------------------------------------
    stop = False
    try:
        while state.epoch < num_epochs and not stop:
            epoch = state.epoch
            if use_den:
                ensure_den_loader(epoch)
            if use_cls:
                loader_cls.set_epoch(epoch)
                ds_cls.set_epoch(epoch)
                it = loader_cls
                if state.step_in_epoch:
                    it = skip_batches(loader_cls, state.step_in_epoch)
                total = len(loader_cls)
            else:
                it = (next(den_iter) for _ in range(n_batches - state.step_in_epoch))
                total = n_batches
            objective.train()
            meters = OrderedDict()
            t0, n_seen, n_steps = time.time(), 0, 0
            pbar = tqdm(total=total, initial=state.step_in_epoch, desc=f'epoch {epoch}', disable=not show,
                        leave=False)
            for batch in it:
                with accelerator.accumulate(objective):
                    y_cls = y_den = target = x_den = sigma_den = None
                    # Each sample's noise (sigma, eps) was drawn in the loader, seeded by (seed, loader, epoch,
                    # sample): y = x + sigma * eps, after MixUp for the classification batch.
                    if use_cls:
                        x, target, _, sigma_cls, eps_cls = batch
                        if mixup_fn is not None:
                            # Seeded per (rank, update): MixUp draws survive a resume wherever it restarts.
                            np.random.seed(hash((args.seed, accelerator.process_index, epoch,
                                                 state.step_in_epoch)) % 2 ** 32)
                            x, target = mixup_fn(x, target)
                        y_cls = add_noise(x, sigma_cls, eps_cls)
                    if use_den:
                        x_den, _, _, sigma_den, eps_den = next(den_iter) if use_cls else batch
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
                        model_ema.update(model_unwrapped, step=state.num_updates)
                    if args.checkpoint_interval and state.num_updates % args.checkpoint_interval == 0:
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
                    elif is_main:
                        _logger.info(f'epoch {epoch} [{state.step_in_epoch}/{total}] {msg} lr {lr:.3g} '
                                     f'{n_seen * accelerator.num_processes / (time.time() - t0):.1f} img/s')
                if stop:
                    break
            pbar.close()
            train_metrics = OrderedDict((k, v / max(1, n_steps)) for k, v in meters.items())
            epoch_done = not stop or state.step_in_epoch >= total
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            last = stop or state.epoch >= num_epochs
            if last or (epoch_done and state.epoch % args.eval_interval == 0):
                eval_metrics = run_validation(
                    validate, accelerator, objective, model_ema, loader_eval, args, use_cls, use_den)
                if is_main:
                    _logger.info(f'epoch {epoch} update {state.num_updates}: ' +
                                 ' '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items()))
                    update_summary(epoch, train_metrics, eval_metrics, filename=str(summary_file),
                                   lr=optimizer.param_groups[0]['lr'], write_header=not summary_file.exists())
                    if args.log_with:
                        accelerator.log({**{f'train/{k}': v for k, v in train_metrics.items()},
                                         **{f'eval/{k}': v for k, v in eval_metrics.items()}},
                                        step=state.num_updates)
                    export('last', model_unwrapped)
                    if model_ema is not None:
                        export('ema_last', model_ema.module)
                    metric = eval_metrics.get(eval_metric)
                    if metric is not None and (state.best_metric is None or metric > state.best_metric):
                        state.best_metric, state.best_epoch = metric, epoch
                        export('best', model_unwrapped)
                        if model_ema is not None:
                            export('ema_best', model_ema.module)
            save_state()
        if is_main:
            if state.best_metric is not None:
                _logger.info(f'*** Best {eval_metric}: {state.best_metric:.4g} (epoch {state.best_epoch})')
            _logger.info(f'Outputs in {output_dir}')
    except NonFiniteLossError as e:
        if is_main:
            _logger.error(str(e))
        raise SystemExit(2) from None
    finally:
        # Tear down in this order: with end_training() alone gloo aborted at exit in 8 of 20 runs here.
        del objective, optimizer, loader_cls, loader_den, loader_eval, den_iter, model_ema, model_unwrapped
        gc.collect()
        accelerator.end_training()
    return output_dir


def run_validation(validate, accelerator, objective, model_ema, loader_eval, args, use_cls, use_den):
    net = accelerator.unwrap_model(objective).model
    from timm_joint.training import DeviceLoader
    kwargs = dict(acc_sigmas_255=args.val_sigmas, psnr_sigmas_255=args.val_psnr_sigmas, seed=args.seed,
                  do_cls=use_cls, do_den=use_den, progress=not args.no_progress,
                  streamed=isinstance(loader_eval, DeviceLoader))
    loader = loader_eval
    if args.val_max_batches:
        import itertools
        loader = list(itertools.islice(loader_eval, args.val_max_batches))
    metrics = validate(net, loader, accelerator, **kwargs)
    if model_ema is not None:
        metrics.update({f'ema_{k}': v for k, v in validate(model_ema.module, loader, accelerator, **kwargs).items()
                        if k != 'num_images'})
    net.train()
    return metrics


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, 'mps', None)
    xpu = getattr(torch, 'xpu', None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def _load_initial_checkpoint(model, path):
    """Load safetensors weights (an export folder or a .safetensors file) into the model, strictly."""
    from safetensors.torch import load_file
    p = Path(path)
    file = p / 'model.safetensors' if p.is_dir() else p
    if file.suffix != '.safetensors' or not file.is_file():
        raise ValueError(f'--initial-checkpoint {path!r}: expected an export folder with model.safetensors '
                         f'or a .safetensors file (pickled checkpoints are refused)')
    try:
        model.load_state_dict(load_file(str(file)))
    except RuntimeError as e:
        raise ValueError(f'--initial-checkpoint {path!r} does not fit model: {e}') from e


def _max_target(ds):
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


if __name__ == '__main__':
    try:
        main()
    except ValueError as e:
        print(f'train_joint.py: error: {e}', file=sys.stderr)
        sys.exit(2)
