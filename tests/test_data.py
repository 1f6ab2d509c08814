"""data.py: per-sample augmentation seeding of IndexedDataset, and the hfds/ reader."""
import pytest
import torch
from torch.utils.data import Dataset

from timm_joint.data import IndexedDataset, create_eval_dataset, prepare_quickstart
from timm_joint.noise import STREAM_CLS, STREAM_DEN, sample_seed


class _RandomDraws(Dataset):
    """Each item is a fresh draw of torch's global generator, as a timm random transform makes."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(8), index


def _draw(seed, stream, epoch, index):
    ds = IndexedDataset(_RandomDraws(), seed=seed, stream=stream)
    ds.set_epoch(epoch)
    img, target, idx = ds[index]
    assert target == idx == index
    return img


def test_augmentations_differ_across_streams_seeds_epochs_and_samples():
    base = _draw(0, STREAM_CLS, 0, 1)
    # Keys that a packed integer seed truncated to 32 bits made collide (seed, stream, epoch 2).
    for other in [(0, STREAM_DEN, 0, 1), (1, STREAM_CLS, 0, 1), (2 ** 33, STREAM_CLS, 0, 1),
                  (0, STREAM_CLS, 1, 1), (0, STREAM_CLS, 2, 1), (0, STREAM_CLS, 0, 2)]:
        assert not torch.equal(_draw(*other), base), other
    assert torch.equal(_draw(0, STREAM_CLS, 0, 1), base)


def test_augmentation_seed_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _draw(0, STREAM_CLS, 0, 1)
    assert torch.equal(torch.rand(3), expected)


def test_sample_seed_is_a_32_bit_hash_of_the_whole_key():
    seeds = {sample_seed(s, st, e, i) for s in (0, 1) for st in (1, 2, 5, 6) for e in (0, 1, 2) for i in range(8)}
    assert len(seeds) == 2 * 4 * 3 * 8
    assert all(0 <= s < 2 ** 32 for s in seeds)
    # A torch generator seeded with it reproduces the draw made under the dataset's fork.
    torch.manual_seed(sample_seed(0, STREAM_CLS + 4, 0, 1))
    assert torch.equal(torch.rand(8), _draw(0, STREAM_CLS, 0, 1))


def test_hfds_reads_the_same_images_and_labels_as_the_image_folder(tmp_path, monkeypatch):
    """timm's hfds/ reader through Hugging Face datasets (its imagefolder builder on a local folder,
    offline) against timm's image-folder reader: the same images with the same class names."""
    pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    root = prepare_quickstart(tmp_path / 'qs', patch_size=16, train_per_class=3, val_per_class=2, short_side=96,
                              images=('astronaut', 'brick', 'coffee'))
    for split in ('train', 'validation'):
        folder = create_eval_dataset('', str(root), img_size=16, split=split)
        hf = create_eval_dataset(f'hfds/{root}', str(tmp_path / 'hf-cache'), img_size=16, split=split)
        assert len(hf) == len(folder) > 0

        def samples(ds):
            names = {v: k for k, v in ds.dataset.reader.class_to_idx.items()}
            return sorted((names[int(c)], x.numpy().tobytes()) for x, c, _ in ds)
        assert samples(hf) == samples(folder)
