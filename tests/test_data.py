"""data.py: per-sample augmentation seeding, the hfds/ reader, and streamed datasets (wds/, hfids/)."""
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


# -- streamed datasets ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def wds_pair(tmp_path_factory):
    """A small image folder and the same images written as webdataset shards."""
    pytest.importorskip('webdataset')
    from timm_joint.data import write_wds
    tmp = tmp_path_factory.mktemp('wds')
    root = prepare_quickstart(tmp / 'qs', patch_size=16, train_per_class=6, val_per_class=2, short_side=96,
                              images=('astronaut', 'brick', 'coffee'))
    return root, write_wds(root, tmp / 'qs-wds', shard_size=3)  # 6 shards: 3 per loader worker below


def _keys_and_targets(ds):
    return [(key, int(target)) for _, target, key in ds]


def test_wds_epoch_holds_each_image_of_the_folder_once(wds_pair):
    """Read through timm's wds reader from the tar shards, and through timm's folder reader from the PNG
    files: every training image once per epoch, named by the same pixel hash, with the same label."""
    from timm.data import create_dataset
    from timm_joint.data import create_joint_datasets, sample_key
    root, shards = wds_pair
    folder = create_dataset('', root=str(root), split='train')
    expected = sorted((sample_key(img, int(t)), int(t)) for img, t in folder)
    ds_cls, ds_den = create_joint_datasets('wds/', str(shards), img_size=16, seed=3, batch_size=2)
    assert len(ds_cls) == len(folder) == 18
    got = _keys_and_targets(ds_cls)
    assert sorted(got) == expected
    # the order is shuffled, fixed by (seed, epoch), and changes with the epoch
    ds_cls.set_epoch(0)
    assert _keys_and_targets(ds_cls) == got
    ds_cls.set_epoch(1)
    again = _keys_and_targets(ds_cls)
    assert again != got and sorted(again) == expected
    # the denoising view streams the same split in its own order
    assert sorted(_keys_and_targets(ds_den)) == expected


def test_streamed_draws_follow_the_sample_not_the_loader_worker(wds_pair):
    """Augmentation and noise of a streamed sample depend on (seed, epoch, sample) alone: one loader
    process against two workers, which split the shards between them and change the order."""
    from torch.utils.data import DataLoader
    from timm_joint.data import create_joint_datasets
    from timm_joint.training import noisy_batch
    _, shards = wds_pair

    def draws(workers):
        ds, _ = create_joint_datasets('wds/', str(shards), img_size=16, seed=3, batch_size=3)
        ds.set_epoch(2)
        ds.set_loader_cfg(num_workers=workers)
        out, order = {}, []
        for x, target, key in DataLoader(ds, batch_size=3, num_workers=workers, generator=ds.generator):
            y, sigma = noisy_batch(x, key, sigma_max=0.2, seed=3, epoch=2, stream=1)
            for k, xi, yi in zip(key.tolist(), x, y):
                out[k] = (xi, yi)
                order.append(k)
        return out, order

    one, order_one = draws(0)
    two, order_two = draws(2)
    assert order_one != order_two and sorted(order_one) == sorted(order_two)
    assert one.keys() == two.keys() and len(one) == 18
    for k in one:
        assert torch.equal(one[k][0], two[k][0]) and torch.equal(one[k][1], two[k][1])
    # a different run seed changes the augmentation of the same sample
    ds, _ = create_joint_datasets('wds/', str(shards), img_size=16, seed=4, batch_size=3)
    ds.set_epoch(2)
    other = {key: x for x, _, key in ds}
    assert any(not torch.equal(other[k], one[k][0]) for k in one)


def test_write_wds_refuses_to_overwrite_a_foreign_folder(wds_pair, tmp_path):
    from timm_joint.data import write_wds
    root, _ = wds_pair
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match='nothing was overwritten'):
        write_wds(root, foreign)
    assert (foreign / 'notes.txt').read_text() == 'keep me'
    with pytest.raises(ValueError, match='is not a folder'):
        write_wds(root, tmp_path / 'out', splits=('train', 'test'))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('streamed', [False, True])
def test_loader_workers_draw_the_noise_the_seeded_generator_draws(streamed, wds_pair):
    """Training noise drawn per sample inside two loader workers against ``seeded_noise`` over each
    batch's indices in this process; the denoising view's noise takes its patch size."""
    from torch.utils.data import DataLoader
    from timm_joint.data import create_joint_datasets
    from timm_joint.noise import seeded_noise
    root, shards = wds_pair
    name, path = ('wds/', shards) if streamed else ('', root)
    views = create_joint_datasets(name, str(path), img_size=16, patch_size=8, seed=5, batch_size=3,
                                  sigma_max_cls=0.2, sigma_max_den=0.4)
    for ds, stream, sigma_max, size in zip(views, (STREAM_CLS, STREAM_DEN), (0.2, 0.4), (16, 8)):
        ds.set_epoch(3)
        kwargs = dict(shuffle=True)
        if streamed:
            ds.set_loader_cfg(num_workers=2)
            kwargs = dict(generator=ds.generator)
        seen = 0
        for x, _, idx, sigma, eps in DataLoader(ds, batch_size=3, num_workers=2, **kwargs):
            assert eps.shape == x.shape == (3, 3, size, size)
            s_ref, e_ref = seeded_noise(idx, (3, size, size), sigma_max=sigma_max, seed=5, epoch=3, stream=stream)
            assert torch.equal(sigma, s_ref) and torch.equal(eps, e_ref)
            seen += len(idx)
        assert seen == 18
    with pytest.raises(ValueError, match='needs a seed'):
        IndexedDataset(_RandomDraws(), sigma_max=0.1)


def test_wds_command_writes_the_shards_timm_reads(wds_pair, tmp_path):
    """python -m timm_joint.data wds: shard sizes in _info.json against the folder's image count and
    against what timm's reader streams from the written shards."""
    import json
    from timm.data import create_dataset
    from timm_joint.data import main
    root, _ = wds_pair
    main(['wds', '--src', str(root), '--dst', str(tmp_path / 'out'), '--shard-size', '4'])
    info = json.loads((tmp_path / 'out' / '_info.json').read_text())
    train = info['splits']['train']
    assert train['num_samples'] == sum(train['shard_lengths']) == 18 and train['shard_lengths'][-1] == 2
    n_folder = sum(1 for p in (root / 'train').rglob('*.png'))
    streamed = create_dataset('wds/', root=str(tmp_path / 'out'), split='train')
    assert n_folder == len(list(streamed)) == 18


def test_write_wds_names_members_as_timm_reads_them(tmp_path):
    """ImageNet-style .JPEG files keep their bytes as .jpg members; a BMP is re-encoded losslessly as PNG;
    timm's reader streams every image (a member named .JPEG or .bmp would be skipped with a warning)."""
    import numpy as np
    from PIL import Image
    from timm.data import create_dataset
    from timm_joint.data import sample_key, write_wds
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for cls, ext in (('a', 'JPEG'), ('b', 'bmp')):
            (tmp_path / 'src' / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / 'src' / split / cls / f'{i}.{ext}')
    from timm.data.readers.img_extensions import add_img_extensions, del_img_extensions
    add_img_extensions('.bmp')  # timm's folder reader takes .png/.jpg/.jpeg unless told more
    try:
        write_wds(tmp_path / 'src', tmp_path / 'out', shard_size=4)
        folder = create_dataset('', root=str(tmp_path / 'src'), split='train')
        expected = sorted(sample_key(img, t) for img, t in folder)
    finally:
        del_img_extensions('.bmp')
    streamed = create_dataset('wds/', root=str(tmp_path / 'out'), split='train')
    assert sorted(sample_key(img, t) for img, t in streamed) == expected
    assert len(expected) == 6


# -- images that cannot be read ------------------------------------------------------------------

def _damage(folder, how):
    """Damage one validation image in place; returns its path."""
    import os
    path = sorted((folder / 'validation').rglob('*.png'))[3]
    data = path.read_bytes()
    path.write_bytes(os.urandom(500) if how == 'random_bytes' else data[:len(data) // 2])
    return path


@pytest.fixture
def damaged(tmp_path):
    return prepare_quickstart(tmp_path / 'qs', patch_size=16, train_per_class=4, val_per_class=3, short_side=96,
                              images=('astronaut', 'brick'))


@pytest.mark.parametrize('how', ['random_bytes', 'truncated'])
@pytest.mark.parametrize('workers', [0, 2])
def test_an_unreadable_image_stops_with_its_path_never_replaced(how, workers, damaged):
    from torch.utils.data import DataLoader
    from timm_joint.data import BadImageError
    bad = _damage(damaged, how)
    ds = create_eval_dataset('', str(damaged), img_size=16)
    loader = DataLoader(ds, batch_size=2, num_workers=workers)
    with pytest.raises(BadImageError) as e:
        for _ in loader:
            pass
    message = str(e.value)
    # One line, the path, why, and the way out, also when a loader worker raised it.
    assert '\n' not in message and f"image '{bad}' cannot be read" in message and '--skip-bad-images' in message
    assert isinstance(e.value, ValueError)


def test_skip_bad_images_leaves_them_out_and_counts_them(damaged):
    from timm_joint.data import create_joint_datasets, skip_bad_images
    bad = _damage(damaged, 'random_bytes')
    ds = create_eval_dataset('', str(damaged), img_size=16)
    n = len(ds)
    checked, skipped = skip_bad_images(ds)
    assert checked == n and [p for p, _ in skipped] == [str(bad)] and 'UnidentifiedImageError' in skipped[0][1]
    assert len(ds) == n - 1
    seen = [ds.dataset.reader.filename(i, absolute=True) for i in range(len(ds))]
    assert str(bad) not in seen and len(set(seen)) == len(seen)  # no image counted twice
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))
    # The two training views share one file list: checking one leaves the file out of both.
    ds_cls, ds_den = create_joint_datasets('', str(damaged), img_size=16, split='validation', seed=0)
    skip_bad_images(ds_cls)
    assert len(ds_cls) == len(ds_den) == n - 1
    with pytest.raises(ValueError, match='checks image folders'):
        skip_bad_images(IndexedDataset(_RandomDraws()))
