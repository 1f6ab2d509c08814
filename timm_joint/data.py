"""Datasets, transforms and the two training loaders (DESIGN §2), plus the offline quickstart data.

Datasets come from timm's ``create_dataset`` (``torch/cifar10``, ``torch/cifar100``, image folders,
``hfds/...``), wrapped so that every sample also returns its dataset index: the noise of a sample is
seeded by (epoch, index), never by rank (``timm_joint.noise.seeded_noise``).

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
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from torchvision import transforms as T

from .noise import sample_seed

__all__ = [
    'IndexedDataset', 'create_joint_datasets', 'create_eval_dataset', 'cls_transform', 'den_transform',
    'eval_transform', 'prepare_quickstart', 'prepare_digits', 'QUICKSTART_IMAGES', 'check_data_dir',
]

# Ten images shipped with scikit-image (no download): colour photographs, grey photographs, textures.
QUICKSTART_IMAGES = (
    'astronaut', 'brick', 'camera', 'chelsea', 'coffee', 'gravel', 'hubble_deep_field',
    'immunohistochemistry', 'retina', 'rocket',
)


class IndexedDataset(Dataset):
    """A map-style dataset whose items are (image, target, index).

    With ``seed`` set, the random transforms of sample ``index`` in epoch ``epoch`` draw from the global
    torch RNG re-seeded by (seed, stream, epoch, index) inside a forked RNG: augmentations then depend
    neither on the worker, the rank, the number of processes, nor on where a resumed run restarted.

    Args:
        dataset: A map-style dataset of (image, target).
        seed: Run seed; None leaves the transforms on the ambient RNG.
        stream: Which random stream (``timm_joint.noise.STREAM_*``).
    """

    def __init__(self, dataset: Dataset, seed: Optional[int] = None, stream: int = 0):
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                'iterable datasets (wds/, hfids/) are not supported: the noise of each sample is seeded '
                'by its index, so training and evaluation need a map-style dataset (folder, torch/, hfds/)')
        self.dataset = dataset
        self.seed = seed
        self.stream = stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, Any, int]:
        if self.seed is None:
            img, target = self.dataset[index]
            return img, target, index
        with torch.random.fork_rng(devices=[]):
            # Offset the stream so augmentation draws never coincide with the noise draws of noise.py.
            torch.manual_seed(sample_seed(self.seed, self.stream + 4, self.epoch, index))
            img, target = self.dataset[index]
        return img, target, index


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
    if name.startswith(('hfds/', 'hfids/', 'wds/', 'tfds/')):
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


def _create_dataset(dataset: str, data_dir: Optional[str], split: str, download: bool, **kwargs):
    from timm.data import create_dataset
    check_data_dir(dataset, data_dir, download)
    try:
        ds = create_dataset(dataset, root=data_dir, split=split, is_training=False, download=download, **kwargs)
    except ImportError as e:
        raise ValueError(f'dataset {dataset!r} needs an optional package ({e}): for hfds/ '
                         f'pip install -e ".[hfds]", for wds/ pip install -e ".[wds]"') from e
    except (FileNotFoundError, RuntimeError, AssertionError, KeyError) as e:
        raise ValueError(f'could not open dataset {dataset!r} (split {split!r}) at {data_dir!r}: '
                         f'{type(e).__name__}: {e}. Expected "" (an image folder), torch/<torchvision name>, '
                         f'hfds/<name>, ...') from e
    if len(ds) == 0:
        raise ValueError(f'dataset {dataset!r} split {split!r} at {data_dir!r} has no images')
    return ds


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
) -> Tuple[IndexedDataset, IndexedDataset]:
    """The classification and denoising views of one training set, each with its own transform.

    Returns:
        (classification dataset, denoising dataset), items (image [C, H, W] in [0, 1], target, index).
    """
    base = _create_dataset(dataset, data_dir, split, download)
    ds_cls = base
    ds_den = copy.copy(base)  # shares the reader (file list), not the transform
    ds_cls.transform = cls_transform(img_size, hflip=hflip, scale=scale)
    ds_den.transform = den_transform(patch_size or img_size, hflip=hflip)
    from .noise import STREAM_CLS, STREAM_DEN
    return IndexedDataset(ds_cls, seed, STREAM_CLS), IndexedDataset(ds_den, seed, STREAM_DEN)


def create_eval_dataset(
        dataset: str,
        data_dir: Optional[str],
        *,
        img_size: int,
        split: str = 'validation',
        download: bool = False,
        crop_pct: float = 1.0,
) -> IndexedDataset:
    """An evaluation dataset: items (image [C, H, W] in [0, 1], target, index)."""
    ds = _create_dataset(dataset, data_dir, split, download)
    ds.transform = eval_transform(img_size, crop_pct=crop_pct)
    return IndexedDataset(ds)


def set_denoising_patch(ds_den: IndexedDataset, patch_size: int, hflip: float = 0.5) -> None:
    """Change the denoising crop size (progressive patch schedule)."""
    ds_den.dataset.transform = den_transform(patch_size, hflip=hflip)


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
    tmp = root.with_name(root.name + '.tmp')
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
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
    from .hub import atomic_replace_dir
    atomic_replace_dir(tmp, root)
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
    tmp = root.with_name(root.name + '.tmp')
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
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
    from .hub import atomic_replace_dir
    atomic_replace_dir(tmp, root)
    return root


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Write the offline image folders used by the quickstart and tests.')
    sub = parser.add_subparsers(dest='cmd', required=True)
    q = sub.add_parser('quickstart', help="patches of scikit-image's sample images, labelled by source image")
    q.add_argument('--root', default='data/quickstart')
    q.add_argument('--train-per-class', type=int, default=256)
    q.add_argument('--val-per-class', type=int, default=64)
    d = sub.add_parser('digits', help="scikit-learn's handwritten digits at 32x32")
    d.add_argument('--root', default='data/digits')
    args = parser.parse_args(argv)
    if args.cmd == 'quickstart':
        path = prepare_quickstart(args.root, train_per_class=args.train_per_class, val_per_class=args.val_per_class)
    else:
        path = prepare_digits(args.root)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
