"""Datasets, transforms and the two training loaders (DESIGN §2), plus the offline quickstart data.

Datasets come from timm's ``create_dataset`` (``torch/cifar10``, ``torch/cifar100``, image folders,
``hfds/...``), wrapped so that every sample also returns its dataset index: the noise of a sample is
seeded by (epoch, index), never by rank (``timm_joint.noise.seeded_noise``). Streamed datasets (``wds/``,
``hfids/``) have no index: timm's readers shuffle and split them by rank and loader worker, and each
sample is named instead by a hash of its decoded pixels and label (``sample_key``), which is the same
whichever rank, worker or shard order delivers it.

Transforms give [0, 1] pixels (no mean/std normalisation: GradResNet takes raw pixels and
``JointDensityWrapper`` normalises inside):
    * classification: padded random crop at small sizes (torchvision ``RandomCrop(size, padding=4)``),
      timm's random-resized crop at large ones, horizontal flip; MixUp/CutMix are applied per batch;
    * denoising: random crop without padding and horizontal flip only (no unnatural images);
    * evaluation: timm's eval transform (resize and centre crop at the config's crop_pct).

Quickstart data (``python -m timm_joint.data quickstart --root data/quickstart``): 32x32 patches of ten
photographs and textures that scikit-image ships, labelled by source image. Train and validation patches
come from disjoint regions of each image (left 75% / right 25% of its columns).
"""
import argparse
import copy
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from torchvision import transforms as T

from .cli import check_in_dir, check_out_dir, program_name, run_or_exit
from .io import atomic_dir
from .noise import sample_seed, seeded_noise

__all__ = [
    'BadImageError', 'skip_bad_images', 'IndexedDataset', 'IndexedIterableDataset', 'sample_key', 'is_streamed', 'write_wds', 'create_joint_datasets',
    'create_eval_dataset', 'cls_transform', 'den_transform',
    'eval_transform', 'prepare_quickstart', 'prepare_digits', 'prepare_textures', 'QUICKSTART_IMAGES', 'check_data_dir',
]

# Ten images shipped with scikit-image (no download): colour photographs, grey photographs, textures.
QUICKSTART_IMAGES = (
    'astronaut', 'brick', 'camera', 'chelsea', 'coffee', 'gravel', 'hubble_deep_field',
    'immunohistochemistry', 'retina', 'rocket',
)


def _augment(fn: Callable[[], Any], seed: Optional[int], stream: int, epoch: int, key: int) -> Any:
    """Run ``fn`` (a load-and-transform of one sample) on torch's global RNG re-seeded by (seed, stream,
    epoch, sample key) inside a forked RNG, or on the ambient RNG when ``seed`` is None."""
    if seed is None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        # Offset the stream so augmentation draws never coincide with the noise draws of noise.py.
        torch.manual_seed(sample_seed(seed, stream + 4, epoch, key))
        return fn()


SIGMA_DISTS = ('squared_uniform', 'fixed')


class BadImageError(ValueError):
    """An image file that cannot be read, named by its path.

    timm's ``ImageDataset`` logs "Skipped sample" for such a file and returns the next image in its
    place, so that image is counted twice; here training and evaluation stop instead (or, with
    ``--skip-bad-images``, leave such files out before they start: ``skip_bad_images``).
    """

    def __init__(self, message: str):
        # A DataLoader worker's exception is raised again in the main process as
        # ``BadImageError("Caught BadImageError in DataLoader worker ...\nOriginal Traceback ...")``:
        # keep the original one-line message, the last line of that traceback.
        if isinstance(message, str) and message.startswith(f'Caught {type(self).__name__}'):
            marker = f'{type(self).__name__}: '
            for line in reversed(message.strip().splitlines()):
                if marker in line:
                    message = line.split(marker, 1)[1]
                    break
        super().__init__(message)


# What PIL raises for a file it cannot decode (truncated, not an image, a decompression bomb...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _decode_image(fp, mode: Optional[str]):
    """Open and fully decode an image (``mode``: convert to it, e.g. 'RGB'), so that a broken file
    fails here, at once, rather than part-way through a transform."""
    from PIL import Image
    img = Image.open(fp)
    if mode:
        return img.convert(mode)  # decodes the pixels
    img.load()
    return img


def _why(e: BaseException) -> str:
    """Why PIL could not read a file, in words that do not repeat its path."""
    from PIL import UnidentifiedImageError
    if isinstance(e, UnidentifiedImageError):
        return f'{type(e).__name__}: not an image format PIL can identify'
    return f'{type(e).__name__}: {e}'


def _load_sample(ds, index: int) -> tuple:
    """``ds[index]``; for timm's ``ImageDataset`` the image is decoded here, as timm would, except that
    a file that cannot be read raises ``BadImageError`` with its path instead of being skipped
    (timm returns the next image in its place)."""
    from timm.data import ImageDataset
    if not isinstance(ds, ImageDataset) or ds.load_bytes:
        return ds[index]
    fp, target, *features = ds.reader[index]
    try:
        img = _decode_image(fp, ds.input_img_mode)
    except _DECODE_ERRORS as e:
        raise BadImageError(
            f'image {ds.reader.filename(index, absolute=True)!r} cannot be read ({_why(e)}): '
            f'replace or remove it, or pass --skip-bad-images to leave such files out (counted and reported)') from None
    finally:
        if hasattr(fp, 'close'):
            fp.close()  # the folder reader opens the file; the pixels are decoded by now
    if ds.transform is not None:
        img = ds.transform(img)
    if target is None:
        target = -1
    elif ds.target_transform is not None:
        target = ds.target_transform(target)
    return (img, target) if ds.additional_features is None else (img, target, *features)


def skip_bad_images(ds, *, workers: int = 1) -> Tuple[int, List[Tuple[str, str]]]:
    """Decode every image of an image-folder dataset once and leave out those that cannot be read.

    The files are dropped from the dataset's file list (shared by the views of one split), so every
    remaining image is counted once and none stands in for another. This reads the whole split up
    front: seconds for the quickstart data, long for ImageNet.

    Args:
        ds: timm's ``ImageDataset`` over a folder (possibly wrapped: ``IndexedDataset``).
        workers: Threads that decode (PIL releases the GIL while it decodes).

    Returns:
        (images checked, [(path, why it cannot be read), ...] of the files left out).

    Raises:
        ValueError: a dataset whose files this cannot list (not an image folder), or one left empty.
    """
    import concurrent.futures
    from timm.data import ImageDataset
    base = ds
    while not isinstance(base, ImageDataset) and hasattr(base, 'dataset'):
        base = base.dataset
    samples = getattr(getattr(base, 'reader', None), 'samples', None)
    if not isinstance(base, ImageDataset) or not isinstance(samples, list) or (
            samples and not isinstance(samples[0][0], str)):
        raise ValueError('--skip-bad-images checks image folders (--dataset ""): other datasets decode their '
                         'images elsewhere')
    mode = base.input_img_mode

    def check(path: str) -> Optional[str]:
        try:
            with open(path, 'rb') as f:
                _decode_image(f, mode)
        except _DECODE_ERRORS as e:
            return _why(e)
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = list(pool.map(check, [s[0] for s in samples]))
    bad = [(s[0], err) for s, err in zip(samples, errors) if err is not None]
    if len(bad) == len(samples):
        raise ValueError(f'none of the {len(samples)} images in {base.reader.root!r} can be read '
                         f'(first: {bad[0][0]!r}, {bad[0][1]})')
    samples[:] = [s for s, err in zip(samples, errors) if err is None]  # in place: the views share the list
    return len(errors), bad


def _with_noise(img: torch.Tensor, target: Any, index: int, sigma_max: Optional[float], seed: Optional[int],
                stream: int, epoch: int, sigma_dist: str = 'squared_uniform') -> tuple:
    """(img, target, index), plus the sample's training noise (sigma, eps) when ``sigma_max`` is set:
    the draws of ``timm_joint.noise.seeded_noise`` for (seed, stream, epoch, index), made here, in the
    loader worker, rather than in the training loop's process. ``sigma_dist`` 'fixed' gives every
    sample sigma = sigma_max (the same eps as 'squared_uniform'; 0: clean images)."""
    if sigma_max is None:
        return img, target, index
    level = dict(sigma=sigma_max) if sigma_dist == 'fixed' else dict(sigma_max=sigma_max)
    sigma, eps = seeded_noise([index], tuple(img.shape), **level, seed=seed, epoch=epoch, stream=stream)
    return img, target, index, sigma[0], eps[0]


def _check_noise_args(sigma_max: Optional[float], seed: Optional[int], sigma_dist: str = 'squared_uniform') -> None:
    if sigma_dist not in SIGMA_DISTS:
        raise ValueError(f'sigma_dist must be one of {SIGMA_DISTS}, got {sigma_dist!r}')
    if sigma_max is not None and (seed is None or not (sigma_max >= 0 if sigma_dist == 'fixed' else sigma_max > 0)):
        raise ValueError(f'training noise needs a seed and sigma_max > 0 (>= 0 when fixed), got seed={seed}, '
                         f'sigma_max={sigma_max}')


class IndexedDataset(Dataset):
    """A map-style dataset whose items are (image, target, index), or with ``sigma_max`` set
    (image, target, index, sigma, eps): the sample's training noise, y = image + sigma * eps.

    With ``seed`` set, the random transforms of sample ``index`` in epoch ``epoch`` draw from the global
    torch RNG re-seeded by (seed, stream, epoch, index) inside a forked RNG: augmentations then depend
    neither on the worker, the rank, the number of processes, nor on where a resumed run restarted.
    The noise is drawn from its own generator for the same key (``timm_joint.noise.seeded_noise``), in
    the loader worker: at 224 px its Gaussian draws cost about as much as decoding the image.

    Args:
        dataset: A map-style dataset of (image, target).
        seed: Run seed; None leaves the transforms on the ambient RNG.
        stream: Which random stream (``timm_joint.noise.STREAM_*``).
        sigma_max: Largest training noise level (pixel units, sigma = sigma_max * u^2); None: no noise.
        sigma_dist: 'squared_uniform' (sigma = sigma_max * u^2) or 'fixed' (sigma = sigma_max).
    """

    def __init__(self, dataset: Dataset, seed: Optional[int] = None, stream: int = 0,
                 sigma_max: Optional[float] = None, sigma_dist: str = 'squared_uniform'):
        if isinstance(dataset, IterableDataset):
            raise TypeError('IndexedDataset needs a map-style dataset; wrap a streamed one in IndexedIterableDataset')
        _check_noise_args(sigma_max, seed, sigma_dist)
        self.dataset = dataset
        self.seed = seed
        self.stream = stream
        self.sigma_max = sigma_max
        self.sigma_dist = sigma_dist
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        img, target = _augment(lambda: _load_sample(self.dataset, index), self.seed, self.stream, self.epoch, index)
        return _with_noise(img, target, index, self.sigma_max, self.seed, self.stream, self.epoch, self.sigma_dist)


def is_streamed(dataset: str) -> bool:
    """Whether a timm dataset name is read as a stream (``wds/``, ``hfids/``) rather than by index."""
    return dataset.lower().startswith(('wds/', 'hfids/'))


def sample_key(img, target) -> int:
    """A 63-bit name for a decoded sample: a hash of its pixels, size, mode and label.

    Streamed samples have no dataset index; this key stands in for it in the per-sample seeds, so a
    sample's noise and augmentation do not depend on the rank, the loader worker or the shard order.
    Two identical images with the same label share their draws.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f'{img.mode},{img.size},{target!r};'.encode())
    h.update(img.tobytes())
    return int.from_bytes(h.digest(), 'little') >> 1


class IndexedIterableDataset(IterableDataset):
    """A streamed dataset (timm's ``IterableImageDataset``: ``wds/``, ``hfids/``) whose items are
    (image, target, key), ``key = sample_key(image, target)`` taken before the transform, and with
    ``sigma_max`` set the sample's training noise (sigma, eps) as ``IndexedDataset`` gives it.

    timm's reader shuffles shards and samples and splits them across ranks (``torch.distributed``, which
    Accelerate has initialised by then) and loader workers; a loader over this dataset is therefore not
    given to ``accelerator.prepare``, which would split it a second time (``timm_joint.training.DeviceLoader``).
    ``set_epoch`` makes the order a function of (seed, epoch) alone: it restarts the reader's pipeline
    and re-seeds ``generator``, which the DataLoader must be given (it seeds the loader workers, and the
    webdataset reader seeds its sample shuffle from them), so a resumed run replays the same stream.

    Args:
        dataset: timm's IterableImageDataset (its own transform is cleared and applied here).
        transform: Image transform.
        seed: Run seed; None leaves the transforms on the ambient RNG.
        stream: Which random stream (``timm_joint.noise.STREAM_*``).
        split_by_rank: For evaluation: every sample exactly once over all ranks (see below); the ranks may
            then hold a different number of batches, so their results are summed, not gathered per batch.
        sigma_max: Largest training noise level (pixel units); None: no noise.
        sigma_dist: 'squared_uniform' (sigma = sigma_max * u^2) or 'fixed' (sigma = sigma_max).
    """

    def __init__(self, dataset: IterableDataset, transform: Optional[Callable] = None,
                 seed: Optional[int] = None, stream: int = 0, split_by_rank: bool = False,
                 sigma_max: Optional[float] = None, sigma_dist: str = 'squared_uniform'):
        _check_noise_args(sigma_max, seed, sigma_dist)
        self.sigma_max = sigma_max
        self.sigma_dist = sigma_dist
        self.dataset = dataset
        self.dataset.transform = None
        self.transform = transform
        self.seed = seed
        self.stream = stream
        self.split_by_rank = split_by_rank
        if split_by_rank:
            # Read the whole split on every rank and keep every world_size-th sample here: timm's readers split
            # evaluation streams by shard and pad each rank's share to equal length, which repeats samples
            # and never ends on a rank that gets no shard. Each rank decodes all samples, transforms its own.
            reader = dataset.reader
            reader.dist_rank, reader.dist_num_replicas = 0, 1
        self.epoch = 0
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)
        order_seed = sample_seed(self.seed or 0, self.stream + 8, epoch, 0)
        self.generator.manual_seed(order_seed)
        reader = getattr(self.dataset, 'reader', None)
        if hasattr(reader, 'worker_seed'):
            # timm's webdataset reader seeds its sample shuffle once, when it builds its pipeline: rebuild it
            # each epoch from a seed of this epoch's (in loader workers it takes the worker's seed, which
            # the DataLoader draws from ``generator``).
            reader.ds = None
            reader.worker_seed = order_seed

    def set_loader_cfg(self, num_workers: int) -> None:
        """Tell the reader how many loader workers split the stream (it sizes each worker's share).

        Raises:
            ValueError: a training stream of wds shards has fewer shards than readers (ranks x loader
                workers): a reader without a shard yields nothing while the epoch length counts its
                share, so one process runs short epochs and several ones fall out of step.
        """
        self.dataset.set_loader_cfg(num_workers=num_workers)
        reader = self.dataset.reader
        shards = getattr(getattr(reader, 'split_info', None), 'filenames', None)
        if getattr(reader, 'is_training', False) and shards is not None:
            ranks = getattr(reader, 'dist_num_replicas', 1)
            readers = ranks * max(1, num_workers)
            if len(shards) < readers:
                raise ValueError(
                    f'the wds/ training split has {len(shards)} shard(s) but {ranks} process(es) x '
                    f'{max(1, num_workers)} loader worker(s) read it, and each reader needs a shard of its own: '
                    f'lower -j/--workers or write smaller shards (python -m timm_joint.data wds --shard-size N)')

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        rank, world = 0, 1
        if self.split_by_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        for position, (img, target) in enumerate(self.dataset):
            if position % world != rank:
                continue
            key = sample_key(img, target)
            if self.transform is not None:
                img = _augment(lambda: self.transform(img), self.seed, self.stream, self.epoch, key)
            yield _with_noise(img, target, key, self.sigma_max, self.seed, self.stream, self.epoch, self.sigma_dist)


class _MinSize:
    """Upsample an image whose shorter side is below ``size`` (so a crop needs no padding)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        if min(w, h) >= self.size:
            return img
        return T.functional.resize(img, self.size, interpolation=T.InterpolationMode.BICUBIC)


def cls_transform(img_size: int, *, hflip: float = 0.5, scale: Sequence[float] = (0.08, 1.0),
                  small_size: int = 64) -> Callable:
    """Classification training transform: [0, 1] tensors [C, H, W].

    At ``img_size <= small_size`` a padded random crop (CIFAR style), above it timm's
    random-resized crop; horizontal flip either way.
    """
    if img_size <= small_size:
        return T.Compose([
            _MinSize(img_size), T.RandomCrop(img_size, padding=4), T.RandomHorizontalFlip(hflip), T.ToTensor()])
    from timm.data import create_transform
    return create_transform(
        img_size, is_training=True, hflip=hflip, scale=tuple(scale), color_jitter=None,
        mean=(0., 0., 0.), std=(1., 1., 1.), interpolation='bicubic')


def den_transform(patch_size: int, *, hflip: float = 0.5) -> Callable:
    """Denoising training transform: random crop without padding, horizontal flip, [0, 1] tensor."""
    return T.Compose([_MinSize(patch_size), T.RandomCrop(patch_size), T.RandomHorizontalFlip(hflip), T.ToTensor()])


def eval_transform(img_size: int, crop_pct: float = 1.0, interpolation: str = 'bicubic') -> Callable:
    """Evaluation transform (timm's: resize, centre crop) giving [0, 1] tensors."""
    from timm.data import create_transform
    return create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
        mean=(0., 0., 0.), std=(1., 1., 1.))


def check_data_dir(dataset: str, data_dir: Optional[str], download: bool = False) -> None:
    """Refuse a missing or empty data folder before any work starts."""
    name = dataset.lower()
    if data_dir and '://' not in str(data_dir) and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ValueError(f'data folder {str(data_dir)!r} is a file: expected a folder ('
                         + ('its .tar shards and _info.json' if name.startswith('wds/') else
                            'the files of ' + repr(dataset) if name.startswith('torch/') else
                            'class subfolders of images, under train/ and validation/') + ')')
    if name.startswith('wds/'):
        if not data_dir:
            raise ValueError('a wds/ dataset needs --data-dir: the folder (or URL) holding its .tar shards and '
                             '_info.json (python -m timm_joint.data wds writes one from an image folder)')
        if '://' not in data_dir and not os.path.isdir(data_dir):
            raise ValueError(f'wds/ data folder {data_dir!r} does not exist')
        return
    if name.startswith(('hfds/', 'hfids/', 'tfds/')):
        return
    if name.startswith('torch/'):
        if not download and (not data_dir or not os.path.isdir(data_dir)):
            raise ValueError(
                f'dataset {dataset!r} needs --data-dir pointing at its files, or --dataset-download '
                f'(got --data-dir {data_dir!r})')
        return
    if not data_dir:
        raise ValueError('an image-folder dataset needs --data-dir (a folder with train/ and validation/ subfolders)')
    if not os.path.isdir(data_dir):
        raise ValueError(f'data folder {data_dir!r} does not exist')
    if not any(Path(data_dir).rglob('*.*')):
        raise ValueError(f'data folder {data_dir!r} is empty: expected class subfolders of images')


def _create_dataset(dataset: str, data_dir: Optional[str], split: str, download: bool, *,
                    is_training: bool = False, batch_size: int = 1, seed: int = 42,
                    num_samples: Optional[int] = None):
    """timm's ``create_dataset``, with errors that say what was expected.

    ``is_training``, ``batch_size``, ``seed`` and ``num_samples`` only matter to streamed datasets: their
    readers shuffle in training, round each worker's share up to whole batches, and need the split's size
    when the dataset does not record it.
    """
    from timm.data import create_dataset
    check_data_dir(dataset, data_dir, download)
    kwargs = {}
    if is_streamed(dataset):
        kwargs = dict(is_training=is_training, batch_size=batch_size, seed=seed, num_samples=num_samples)
    try:
        if dataset.lower().startswith('wds/') and not _has_package('webdataset'):
            raise ImportError('No module named webdataset')
        ds = create_dataset(dataset, root=data_dir, split=split, download=download, **kwargs)
    except ImportError as e:
        raise ValueError(f'dataset {dataset!r} needs an optional package ({e}): for hfds/ and hfids/ '
                         f'pip install -e ".[hfds]", for wds/ pip install -e ".[wds]"') from e
    except (FileNotFoundError, RuntimeError, AssertionError, KeyError, ValueError) as e:
        hint = ''
        if is_streamed(dataset):
            hint = (' A streamed split whose size is not recorded needs --train-num-samples / --val-num-samples; '
                    'a wds/ folder needs _info.json naming each split\'s shards and sizes.')
        raise ValueError(f'could not open dataset {dataset!r} (split {split!r}) at {data_dir!r}: '
                         f'{type(e).__name__}: {str(e).rstrip(".")}. Expected "" (an image folder), torch/<torchvision name>, '
                         f'hfds/<name>, hfids/<name>, wds/ ...{hint}') from e
    if len(ds) == 0:
        raise ValueError(f'dataset {dataset!r} split {split!r} at {data_dir!r} has no images')
    return ds


def _has_package(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def create_joint_datasets(
        dataset: str,
        data_dir: Optional[str],
        *,
        img_size: int,
        patch_size: Optional[int] = None,
        split: str = 'train',
        download: bool = False,
        hflip: float = 0.5,
        scale: Sequence[float] = (0.08, 1.0),
        seed: Optional[int] = None,
        batch_size: int = 1,
        den_batch_size: Optional[int] = None,
        num_samples: Optional[int] = None,
        sigma_max_cls: Optional[float] = None,
        sigma_max_den: Optional[float] = None,
        sigma_dist_cls: str = 'squared_uniform',
) -> Tuple[Union[IndexedDataset, IndexedIterableDataset], Union[IndexedDataset, IndexedIterableDataset]]:
    """The classification and denoising views of one training set, each with its own transform.

    A streamed dataset (``wds/``, ``hfids/``) gets two readers, each streaming the whole split;
    ``batch_size`` / ``den_batch_size`` and ``num_samples`` are passed to them.
    ``sigma_max_cls`` / ``sigma_max_den`` (pixel units) make each view draw its training noise too;
    ``sigma_dist_cls`` 'fixed' puts every classification image at sigma_max_cls (Cohen et al.'s
    Gaussian augmentation at the smoothing sigma; 0: clean images).

    Returns:
        (classification dataset, denoising dataset), items (image [C, H, W] in [0, 1], target, index or
        key), followed by (sigma, eps [C, H, W]) for a view with a sigma_max.
    """
    from .noise import STREAM_CLS, STREAM_DEN
    t_cls = cls_transform(img_size, hflip=hflip, scale=scale)
    t_den = den_transform(patch_size or img_size, hflip=hflip)
    if is_streamed(dataset):
        views = []
        for transform, bs, stream, sigma_max, dist in (
                (t_cls, batch_size, STREAM_CLS, sigma_max_cls, sigma_dist_cls),
                (t_den, den_batch_size or batch_size, STREAM_DEN, sigma_max_den, 'squared_uniform')):
            ds = _create_dataset(dataset, data_dir, split, download, is_training=True, batch_size=bs,
                                 seed=42 if seed is None else seed, num_samples=num_samples)
            views.append(IndexedIterableDataset(ds, transform, seed, stream, sigma_max=sigma_max, sigma_dist=dist))
        return views[0], views[1]
    base = _create_dataset(dataset, data_dir, split, download)
    ds_cls = base
    ds_den = copy.copy(base)  # shares the reader (file list), not the transform
    ds_cls.transform = t_cls
    ds_den.transform = t_den
    return (IndexedDataset(ds_cls, seed, STREAM_CLS, sigma_max=sigma_max_cls, sigma_dist=sigma_dist_cls),
            IndexedDataset(ds_den, seed, STREAM_DEN, sigma_max=sigma_max_den))


def create_eval_dataset(
        dataset: str,
        data_dir: Optional[str],
        *,
        img_size: int,
        split: str = 'validation',
        download: bool = False,
        crop_pct: float = 1.0,
        batch_size: int = 1,
        num_samples: Optional[int] = None,
) -> Union[IndexedDataset, IndexedIterableDataset]:
    """An evaluation dataset: items (image [C, H, W] in [0, 1], target, index or key)."""
    transform = eval_transform(img_size, crop_pct=crop_pct)
    if is_streamed(dataset):
        ds = _create_dataset(dataset, data_dir, split, download, batch_size=batch_size, num_samples=num_samples)
        return IndexedIterableDataset(ds, transform, split_by_rank=True)
    ds = _create_dataset(dataset, data_dir, split, download)
    ds.transform = transform
    return IndexedDataset(ds)


def set_denoising_patch(ds_den: Union[IndexedDataset, IndexedIterableDataset], patch_size: int,
                        hflip: float = 0.5) -> None:
    """Change the denoising crop size (progressive patch schedule)."""
    holder = ds_den if isinstance(ds_den, IndexedIterableDataset) else ds_den.dataset
    holder.transform = den_transform(patch_size, hflip=hflip)


# -- webdataset shards --------------------------------------------------------------------------------

def write_wds(
        src: Union[str, Path],
        dst: Union[str, Path],
        *,
        splits: Sequence[str] = ('train', 'validation'),
        shard_size: int = 1000,
        seed: int = 0,
) -> Path:
    """Write an image folder (``src/<split>/<class>/<image>``) as webdataset shards for ``--dataset wds/``.

    Each split becomes ``dst/<split>-NNNNNN.tar`` shards of ``shard_size`` samples in a seeded random
    order (so a shard mixes classes), each sample ``<key>.jpg``, ``.png`` or ``.webp`` (the names timm's
    reader looks for: JPEG, PNG and WebP files keep their bytes, other formats are re-encoded as PNG) and
    ``<key>.cls`` (its label: timm's image-folder class index, so both readers agree), plus
    ``dst/_info.json`` with each split's shard names and sizes, which timm's reader needs. The folder is
    written whole under a temporary name and then moved in place; an existing ``dst`` that this function
    did not write is refused.

    Returns:
        The ``dst`` folder.
    """
    from timm.data.readers.reader_image_folder import find_images_and_targets
    src, dst = Path(src), Path(dst)
    if shard_size <= 0:
        raise ValueError(f'shard_size must be > 0, got {shard_size}')
    if dst.exists() and any(dst.iterdir()) and not (dst / '_info.json').is_file():
        raise ValueError(f'{dst} exists and is not a webdataset folder written here: choose another destination '
                         f'(nothing was overwritten)')
    with atomic_dir(dst) as tmp:
        info = {'name': src.name, 'splits': {}}
        for split in splits:
            if not (src / split).is_dir():
                raise ValueError(f'{src / split} is not a folder: expected {src}/<split>/<class>/<image> '
                                 f'for splits {list(splits)}')
            samples, _ = find_images_and_targets(str(src / split))
            if not samples:
                raise ValueError(f'{src / split} holds no images')
            order = np.random.default_rng(seed).permutation(len(samples))
            names, lengths = [], []
            for start in range(0, len(order), shard_size):
                name = f'{split}-{start // shard_size:06d}.tar'
                part = order[start:start + shard_size]
                with tarfile.open(tmp / name, 'w') as tar:
                    for i in part:
                        path, target = samples[i]
                        key = f'{split}_{int(i):08d}'
                        ext, data = _wds_image(Path(path))
                        _tar_add(tar, f'{key}.{ext}', data)
                        _tar_add(tar, f'{key}.cls', str(int(target)).encode())
                names.append(name)
                lengths.append(len(part))
            info['splits'][split] = {'name': split, 'num_samples': len(samples), 'filenames': names,
                                     'shard_lengths': lengths}
        (tmp / '_info.json').write_text(json.dumps(info, indent=1))
    return dst


def _wds_image(path: Path) -> Tuple[str, bytes]:
    """(extension, bytes) of an image as a shard member under a name timm's wds reader reads
    ('jpg;png;webp'): JPEG, PNG and WebP keep their bytes, anything else is re-encoded as PNG."""
    from PIL import Image
    with Image.open(path) as img:
        fmt = img.format
        if fmt not in ('JPEG', 'PNG', 'WEBP'):
            import io
            buf = io.BytesIO()
            img.save(buf, format='PNG')
            return 'png', buf.getvalue()
    return {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}[fmt], path.read_bytes()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


# -- quickstart data -------------------------------------------------------------------------------

def _write_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(arr).save(path)


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def prepare_quickstart(
        root: Union[str, Path],
        *,
        patch_size: int = 32,
        train_per_class: int = 256,
        val_per_class: int = 64,
        short_side: int = 256,
        seed: int = 0,
        images: Sequence[str] = QUICKSTART_IMAGES,
) -> Path:
    """Write the quickstart image folders: ``root/train/<image>/*.png`` and ``root/validation/<image>/*.png``.

    Each source image is resized so its shorter side is ``short_side``; train patches are cut from the
    left 75% of its columns, validation patches from the right 25%, so no pixel is in both splits.
    Rewrites nothing if the folder is already complete for these settings.

    Returns:
        The root folder.
    """
    import skimage.data
    from skimage.transform import resize

    root = Path(root)
    stamp = f'{patch_size},{train_per_class},{val_per_class},{short_side},{seed},{",".join(images)}'
    marker = root / '.quickstart'
    if marker.exists() and marker.read_text() == stamp:
        return root
    rng = np.random.default_rng(seed)
    with atomic_dir(root) as tmp:
        for name in images:
            img = _as_rgb_uint8(getattr(skimage.data, name)())
            h, w = img.shape[:2]
            s = short_side / min(h, w)
            img = (resize(img, (round(h * s), round(w * s)), anti_aliasing=True, preserve_range=True)
                   .round().clip(0, 255).astype(np.uint8))
            h, w = img.shape[:2]
            split_col = int(0.75 * w)
            regions = {'train': (0, split_col, train_per_class), 'validation': (split_col, w, val_per_class)}
            for split, (x0, x1, n) in regions.items():
                if x1 - x0 < patch_size:
                    raise ValueError(f'image {name!r} is too narrow for {patch_size}px patches in split {split!r}')
                out = tmp / split / name
                out.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    y = int(rng.integers(0, h - patch_size + 1))
                    x = int(rng.integers(x0, x1 - patch_size + 1))
                    _write_png(img[y:y + patch_size, x:x + patch_size], out / f'{i:04d}.png')
        (tmp / '.quickstart').write_text(stamp)
    return root


def prepare_digits(root: Union[str, Path], *, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's handwritten digits (1,797 8x8 grey images) as 32x32 RGB image folders.

    The split is stratified by class and seeded; images are upsampled bilinearly.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    stamp = f'digits,{img_size},{val_fraction},{seed}'
    if (root / '.digits').exists() and (root / '.digits').read_text() == stamp:
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    with atomic_dir(root) as tmp:
        for c in range(10):
            idx = np.flatnonzero(digits.target == c)
            rng.shuffle(idx)
            n_val = int(round(val_fraction * len(idx)))
            for split, part in (('validation', idx[:n_val]), ('train', idx[n_val:])):
                out = tmp / split / str(c)
                out.mkdir(parents=True, exist_ok=True)
                for i in part:
                    arr = (digits.images[i] / 16. * 255.).round().astype(np.uint8)
                    im = Image.fromarray(arr).resize((img_size, img_size), Image.BILINEAR).convert('RGB')
                    im.save(out / f'{i:04d}.png')
        (tmp / '.digits').write_text(stamp)
    return root


def prepare_textures(root: Union[str, Path], *, img_size: int = 32, train_per_class: int = 1000,
                     val_per_class: int = 250, seed: int = 0) -> Path:
    """Write four classes of stationary Gaussian colour textures (``timm_joint.textures``) as image folders.

    The classes differ only in their power spectrum (same mean, pixel variance and colour covariance),
    so a classifier must measure how each image's energy spreads over frequencies; the Bayes classifier's
    accuracy is known (about 96 % at sigma 15/255). Each image is a periodic field drawn independently.
    """
    from . import textures

    root = Path(root)
    stamp = f'textures,{img_size},{train_per_class},{val_per_class},{seed},{sorted(textures.KINDS.items())}'
    if (root / '.textures').exists() and (root / '.textures').read_text() == stamp:
        return root
    with atomic_dir(root) as tmp:
        for split, n, offset in (('train', train_per_class, 0), ('validation', val_per_class, 1)):
            for c, kind in enumerate(textures.KINDS):
                rng = np.random.default_rng([seed, offset, c])
                x = textures.sample(kind, n, img_size, rng=rng)
                arr = (x.clip(0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
                out = tmp / split / kind
                out.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    _write_png(arr[i], out / f'{i:04d}.png')
        (tmp / '.textures').write_text(stamp)
    return root


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=program_name('timm_joint.data'),
                                     description='Write the offline image folders used by the quickstart and tests.')
    sub = parser.add_subparsers(dest='cmd', required=True)
    q = sub.add_parser('quickstart', help="patches of scikit-image's sample images, labelled by source image")
    q.add_argument('--root', default='data/quickstart')
    q.add_argument('--train-per-class', type=int, default=256)
    q.add_argument('--val-per-class', type=int, default=64)
    d = sub.add_parser('digits', help="scikit-learn's handwritten digits at 32x32")
    d.add_argument('--root', default='data/digits')
    t = sub.add_parser('textures', help='four classes of Gaussian textures that differ only in their power spectrum')
    t.add_argument('--root', default='data/textures')
    w = sub.add_parser('wds', help='an image folder (<split>/<class>/<image>) as webdataset shards for --dataset wds/')
    w.add_argument('--src', default='data/quickstart')
    w.add_argument('--dst', default='data/quickstart-wds')
    w.add_argument('--splits', nargs='+', default=['train', 'validation'])
    w.add_argument('--shard-size', type=int, default=1000)
    args = parser.parse_args(argv)
    def prepare() -> Path:
        if args.cmd == 'wds':
            check_in_dir(args.src, '--src', 'an image folder <split>/<class>/<image>')
            check_out_dir(args.dst, '--dst')
        else:
            check_out_dir(args.root, '--root')
        if args.cmd == 'quickstart':
            return prepare_quickstart(args.root, train_per_class=args.train_per_class,
                                      val_per_class=args.val_per_class)
        if args.cmd == 'digits':
            return prepare_digits(args.root)
        if args.cmd == 'textures':
            return prepare_textures(args.root)
        return write_wds(args.src, args.dst, splits=args.splits, shard_size=args.shard_size)

    print(f'wrote {run_or_exit("timm_joint.data", prepare)}')


if __name__ == '__main__':
    main()
