"""Tests of the data pipeline: sources, cache, batched augmentation and the device loader.

Everything runs on data generated in ``tmp_path`` (plus scikit-learn's bundled digits).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reslab.data import BatchAugment, BatchLoader, DataSplits, ImageArray, cutout, load_data, random_crop, random_flip
from reslab.data import sources
from reslab.data.sources import stratified_split


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _rgb(h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, im, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _class_tree(base, classes=("cat", "dog"), n=3, size=(16, 16), mode="RGB", start=0):
    """``n`` PNGs per class under ``base``; pixel values encode class and index."""
    for ci, cls in enumerate(classes):
        for i in range(n):
            arr = np.full((*size, 3), (ci * 60 + i) % 256, np.uint8)
            im = Image.fromarray(arr).convert(mode)
            _save(base / cls / f"{start + i:03d}.png", im)


def _load(path, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("progress", False)
    return load_data(str(path), **kw)


@pytest.fixture
def mixed_folder(tmp_path):
    """train/test ImageFolder with every supported flavour of image plus broken files."""
    root = tmp_path / "mixed"
    tr = root / "train"
    _save(tr / "a" / "rgb.jpg", Image.fromarray(_rgb(seed=1)), quality=95)
    _save(tr / "a" / "gray.PNG", Image.fromarray(np.full((32, 32), 77, np.uint8), "L"))
    _save(tr / "a" / "plain.bmp", Image.fromarray(_rgb(seed=2)))
    transparent = np.zeros((32, 32, 4), np.uint8)  # black but fully transparent
    _save(tr / "a" / "rgba.png", Image.fromarray(transparent, "RGBA"))
    _save(tr / "a" / "pal.gif", Image.fromarray(_rgb(seed=3)).convert("P"))
    _save(tr / "a" / "pic.webp", Image.fromarray(_rgb(seed=4)))
    _save(tr / "b" / "scan.tiff", Image.fromarray(_rgb(seed=5)))
    _save(tr / "b" / "deep.png", Image.fromarray(np.full((32, 32), 257 * 100, np.uint16)))
    _save(tr / "b" / "print.jpg", Image.fromarray(_rgb(seed=6)).convert("CMYK"))
    _save(tr / "b" / "large.jpg", Image.fromarray(_rgb(64, 48, seed=7)))  # other size: resize + crop
    # broken files: truncated JPEG, empty file, text, text pretending to be a JPEG
    good = (tr / "a" / "rgb.jpg").read_bytes()
    (tr / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tr / "a" / "empty.png").write_bytes(b"")
    (tr / "b" / "notes.txt").write_text("not an image")
    (tr / "b" / "fake.jpeg").write_text("not a jpeg either")
    _save(root / "test" / "a" / "t0.png", Image.fromarray(_rgb(20, 20, seed=8)))
    _save(root / "test" / "b" / "t1.jpg", Image.fromarray(_rgb(seed=9)))
    return root


# --------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------
def test_mixed_folder_decodes_and_skips_bad_files(mixed_folder, tmp_path):
    d = _load(mixed_folder, tmp_path)
    assert isinstance(d, DataSplits)
    assert d.classes == ["a", "b"] and d.num_classes == 2
    assert d.channels == 3 and d.image_size == (32, 32)  # colour present; most common size
    assert d.train.images.dtype == np.uint8 and d.train.images.shape == (10, 32, 32, 3)
    assert d.train.labels.dtype == np.int64 and d.train.labels.tolist() == [0] * 6 + [1] * 4
    assert len(d.test.labels) == 2 and d.test.images.shape[1:] == (32, 32, 3) and d.val is None
    skipped = dict(d.skipped)
    assert set(skipped) == {"train/a/truncated.jpg", "train/a/empty.png", "train/b/notes.txt", "train/b/fake.jpeg"}
    assert all(reason for reason in skipped.values())
    files = d.train.files
    img = dict(zip(files, d.train.images))
    assert (img["train/a/rgba.png"] == 255).all()  # transparency composited over white
    assert (img["train/b/deep.png"] == 100).all()  # 16-bit 25700 -> 8-bit 100
    assert (img["train/a/gray.PNG"] == 77).all()  # grey replicated into 3 channels
    assert np.array_equal(img["train/a/plain.bmp"], _rgb(seed=2))
    assert len(d.mean) == len(d.std) == 3 and all(0 <= m <= 1 for m in d.mean)


def test_grayscale_folder_gets_one_channel_and_explicit_options(tmp_path):
    root = tmp_path / "gray"
    _class_tree(root / "train", mode="L", size=(12, 10))
    _class_tree(root / "test", mode="L", n=1, size=(12, 10))
    d = _load(root, tmp_path)
    assert d.channels == 1 and d.image_size == (12, 10)
    d3 = _load(root, tmp_path, channels=3, image_size=20)
    assert d3.train.images.shape == (6, 20, 20, 3)


def test_train_val_layout_uses_val_as_test_and_carves_val(tmp_path):
    root = tmp_path / "tv"
    _class_tree(root / "train", n=10)
    _class_tree(root / "val", n=2)
    d = _load(root, tmp_path, val_fraction=0.2, seed=3)
    assert len(d.test.labels) == 4 and all(f.startswith("val/") for f in d.test.files)
    assert len(d.val.labels) == 4 and len(d.train.labels) == 16
    assert not set(d.val.files) & set(d.train.files)


def test_train_val_test_layout_uses_given_val(tmp_path):
    root = tmp_path / "tvt"
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _class_tree(root / split, n=n)
    d = _load(root, tmp_path)
    assert [len(s.labels) for s in (d.train, d.val, d.test)] == [8, 4, 6]


def test_single_folder_split_is_deterministic_and_disjoint(tmp_path):
    root = tmp_path / "single"
    _class_tree(root, classes=("x", "y", "z"), n=10)
    a = _load(root, tmp_path, seed=1)
    b = _load(root, tmp_path, seed=1)
    c = _load(root, tmp_path, seed=2)
    assert a.train.files == b.train.files and a.test.files == b.test.files
    assert not set(a.train.files) & set(a.test.files)
    assert len(set(a.train.files) | set(a.test.files)) == 30
    assert np.bincount(a.test.labels).tolist() == [2, 2, 2]  # stratified 20 %
    assert a.test.files != c.test.files


def test_class_only_in_test_is_an_error(tmp_path):
    root = tmp_path / "bad"
    _class_tree(root / "train", classes=("cat", "dog"), n=1)
    _class_tree(root / "test", classes=("cat", "dog", "emu"), n=1)
    with pytest.raises(ValueError, match="emu"):
        _load(root, tmp_path)


def test_all_files_broken_is_a_clear_error(tmp_path):
    root = tmp_path / "broken"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could be decoded"):
        _load(root, tmp_path)


def test_decompression_bomb_limit_skips(tmp_path, monkeypatch):
    root = tmp_path / "bomb"
    _class_tree(root / "train", n=2, size=(8, 8))
    _save(root / "train" / "cat" / "huge.png", Image.fromarray(_rgb(40, 40)))
    _class_tree(root / "test", n=1, size=(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    d = _load(root, tmp_path)
    assert [f for f, _ in d.skipped] == ["train/cat/huge.png"] and "Bomb" in d.skipped[0][1]
    assert d.image_size == (8, 8) and len(d.train.labels) == 4


def test_process_pool_matches_in_process_decode(tmp_path):
    root = tmp_path / "many"
    _class_tree(root / "train", n=40, size=(8, 8))
    _class_tree(root / "test", n=2, size=(8, 8))
    (root / "train" / "cat" / "zz.jpg").write_bytes(b"")
    one = _load(root, tmp_path, workers=1, cache_dir=tmp_path / "c1")
    two = _load(root, tmp_path, workers=2, cache_dir=tmp_path / "c2")
    assert np.array_equal(one.train.images, two.train.images) and one.train.files == two.train.files
    assert one.skipped == two.skipped == [("train/cat/zz.jpg", one.skipped[0][1])]


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "cached"
    _class_tree(root / "train", n=3)
    _class_tree(root / "test", n=1)
    first = _load(root, tmp_path)
    assert isinstance(first.train.images, np.memmap)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(sources, "decode_files", no_decoding)
    monkeypatch.setattr(sources, "probe_files", no_decoding)
    again = _load(root, tmp_path)
    assert np.array_equal(first.train.images, again.train.images) and first.mean == again.mean

    touched = root / "train" / "cat" / "000.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(AssertionError, match="decoded"):
        _load(root, tmp_path)
    monkeypatch.undo()
    _load(root, tmp_path)  # re-decode the touched folder
    _class_tree(root / "train", classes=("dog",), n=1, start=50)  # add a file
    monkeypatch.setattr(sources, "decode_files", no_decoding)
    monkeypatch.setattr(sources, "probe_files", no_decoding)
    with pytest.raises(AssertionError, match="decoded"):
        _load(root, tmp_path)
    # only complete entries were published (no temporary directories left behind)
    assert not [p for p in (tmp_path / "cache" / "folders").iterdir() if p.name.startswith(".tmp")]


# --------------------------------------------------------------------------------------
# CIFAR pickles and digits
# --------------------------------------------------------------------------------------
def _cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"class{i}".encode() for i in range(10)]
    all_data, all_labels = [], []
    for i in range(1, 6):
        data, labels = _cifar_images(4, i), [(i + k) % 10 for k in range(4)]
        all_data.append(data)
        all_labels += labels
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _cifar_images(3, 9), b"labels": [7, 8, 9]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)

    for spec in (f"cifar10:{tmp_path}", f"cifar10:{folder}"):  # parent or the folder itself
        d = load_data(spec)
        assert d.name == spec and d.classes == [n.decode() for n in names]
        assert d.train.images.shape == (20, 32, 32, 3) and d.test.labels.tolist() == [7, 8, 9]
        assert d.train.labels.tolist() == all_labels
        row = all_data[0][0]  # planes R, G, B of 1024 values each
        assert d.train.images[0, 0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]]


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [f"fine{i}" for i in range(100)]
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": _cifar_images(6, 0), b"fine_labels": [99, 0, 5, 5, 1, 2], b"coarse_labels": [0] * 6}, f)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": _cifar_images(2, 1), b"fine_labels": [3, 4], b"coarse_labels": [1, 1]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [b"c"] * 20}, f)
    d = load_data(f"cifar100:{tmp_path}")
    assert d.classes == fine and d.num_classes == 100
    assert d.train.labels.tolist() == [99, 0, 5, 5, 1, 2] and d.test.labels.tolist() == [3, 4]


def test_digits_fixed_test_split():
    a = load_data("digits", seed=0)
    b = load_data("digits", seed=5, val_fraction=0.1)
    assert len(a.train.labels) + len(a.test.labels) == 1797 and a.val is None
    assert a.image_size == (8, 8) and a.channels == 1 and a.classes == [str(i) for i in range(10)]
    assert a.train.images.max() == 255 and a.train.images.dtype == np.uint8
    assert np.array_equal(a.test.images, b.test.images) and np.array_equal(a.test.labels, b.test.labels)
    assert len(b.train.labels) + len(b.val.labels) == len(a.train.labels)
    assert len(a.test.labels) == 359 and np.bincount(a.test.labels).min() >= 35  # stratified


def test_stratified_split_covers_every_index():
    labels = np.repeat(np.arange(4), [2, 5, 9, 20])
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
    assert set(labels[held]) == set(labels[keep]) == {0, 1, 2, 3}


# --------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------
def test_random_crop_matches_pad_and_slice():
    x = torch.randn(16, 3, 10, 12)
    g = torch.Generator().manual_seed(7)
    out = random_crop(x, 3, g)
    g = torch.Generator().manual_seed(7)  # redraw the same offsets
    dy = torch.randint(0, 7, (16,), generator=g)
    dx = torch.randint(0, 7, (16,), generator=g)
    padded = F.pad(x, (3, 3, 3, 3))
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 10, dx[i] : dx[i] + 12] for i in range(16)])
    assert out.shape == x.shape and torch.equal(out, expected)
    reflect = random_crop(x, 3, torch.Generator().manual_seed(7), mode="reflect")
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 10, dx[i] : dx[i] + 12] for i in range(16)])
    assert torch.equal(reflect, expected)


def test_augmentations_are_per_image_and_deterministic():
    x = torch.randn(1, 3, 8, 8).expand(64, -1, -1, -1).contiguous()
    crops = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 5  # each image its own offset
    flips = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(f, x[0].flip(2)) for f in flips])
    kept = torch.tensor([torch.equal(f, x[0]) for f in flips])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54
    holes = cutout(torch.ones(64, 1, 8, 8), 4, torch.Generator().manual_seed(0))
    zeros = (holes == 0).flatten(1).sum(1)
    assert (zeros <= 16).all() and (zeros > 0).all() and len(set(zeros.tolist())) > 1
    aug = BatchAugment(crop_padding=2, flip=True, cutout=3)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    data = ImageArray(np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8),
                      np.arange(40, dtype=np.int64), None)
    aug = BatchAugment(crop_padding=0, flip=True, flip_mode="alternate")
    loader = BatchLoader(data, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=aug, seed=3)
    plain = BatchLoader(data, batch_size=40, mean=(0.5,) * 3, std=(0.25,) * 3)
    reference = next(iter(plain))[0]

    def mirrored(epoch):
        loader.set_epoch(epoch)
        flags = torch.zeros(40, dtype=torch.bool)
        for x, y in loader:
            for image, i in zip(x, y.tolist()):
                assert torch.equal(image, reference[i]) or torch.equal(image, reference[i].flip(2))
                flags[i] = torch.equal(image, reference[i].flip(2))
        return flags

    first, second, third = mirrored(0), mirrored(1), mirrored(2)
    assert 8 < first.sum() < 32  # a fair coin per image in the first epoch
    assert torch.equal(second, ~first) and torch.equal(third, first)  # then every other epoch
    with pytest.raises(ValueError, match="flip_mode"):
        BatchAugment(flip_mode="sometimes")
    with pytest.raises(ValueError, match="flip_mask"):
        aug(reference)


# --------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------
def _ids_data(n=103, size=6, channels=3):
    """Images whose label is their own index, so batches reveal which samples they hold."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return ImageArray(images, np.arange(n, dtype=np.int64), None)


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_epoch_covers_every_sample_once_and_normalises():
    data = _ids_data()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = BatchLoader(data, batch_size=16, mean=mean, std=std, shuffle=True)
    batches = _collect(loader)
    assert len(loader) == len(batches) == 7 and batches[-1][1].shape[0] == 103 - 96
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(103)) and ys.tolist() != list(range(103))
    x, y = batches[0]
    ref = (torch.from_numpy(data.images[y.numpy()]).permute(0, 3, 1, 2) / 255 - torch.tensor(mean).view(1, 3, 1, 1))
    ref = ref / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and torch.allclose(x, ref, atol=1e-5)
    dropped = BatchLoader(data, batch_size=16, mean=mean, std=std, shuffle=True, drop_last=True)
    assert len(dropped) == 6 and len(torch.cat([y for _, y in dropped]).unique()) == 96
    evaluation = BatchLoader(data, batch_size=16, mean=mean, std=std)
    assert torch.cat([y for _, y in evaluation]).tolist() == list(range(103))  # in order, all kept


def test_loader_is_deterministic_per_epoch():
    data = _ids_data()
    kw = dict(batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=BatchAugment(2), seed=4)
    a, b = BatchLoader(data, **kw), BatchLoader(data, **kw)
    first = _collect(a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, _collect(b)))
    a.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in _collect(a)]), torch.cat([y for _, y in first]))


def test_loader_resumes_mid_epoch_exactly():
    data = _ids_data()
    kw = dict(batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, drop_last=True, augment=BatchAugment())
    full = BatchLoader(data, **kw)
    full.set_epoch(2)
    reference, state = [], None
    for step, (x, y) in enumerate(full):
        reference.append((x.clone(), y.clone()))
        if step == 2:
            state = full.state_dict()
    assert state == {"epoch": 2, "step": 3}
    resumed = BatchLoader(data, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's usual call keeps the restored step
    rest = _collect(resumed)
    assert len(rest) == len(reference) - 3
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(rest, reference[3:]))
    assert len(_collect(resumed)) == len(reference)  # a second pass starts at the top again


@pytest.mark.parametrize("n, drop_last", [(96, True), (103, True), (103, False)])
def test_loader_shards_partition_the_global_batch(n, drop_last):
    data = _ids_data(n)
    kw = dict(batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, drop_last=drop_last, seed=1)
    single = _collect(BatchLoader(data, **kw))
    shards = [_collect(BatchLoader(data, **kw, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for step, (_, y) in enumerate(single):
        y0, y1 = shards[0][step][1], shards[1][step][1]
        assert y0.shape == y1.shape
        union = torch.cat([y0, y1])
        if y.shape[0] == 16:
            assert torch.equal(union, y) and not set(y0.tolist()) & set(y1.tolist())
        else:  # last partial batch: padded with repeats so both ranks have the same size
            assert set(union.tolist()) >= set(y.tolist())


def test_loader_resizes_and_formats():
    d = load_data("digits")
    loader = BatchLoader(d.test, batch_size=64, mean=d.mean, std=d.std, image_size=32, channels_last=True,
                         dtype=torch.bfloat16, augment=BatchAugment())
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.bfloat16 and y.shape == (64,)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="divisible"):
        BatchLoader(d.test, batch_size=10, mean=d.mean, std=d.std, world_size=3)


def test_resize_batch_matches_pil_downscaling_and_keeps_the_layout():
    """Progressive resizing's op is PIL's antialiased bilinear downscale (what a per-image pipeline would do),
    batched; channels_last stays channels_last, and the full size passes through untouched."""
    from reslab.data.augment import resize_batch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    y = resize_batch(x, 24)
    assert y.shape == (4, 3, 24, 24) and y.is_contiguous(memory_format=torch.channels_last)
    pil = np.stack([np.asarray(Image.fromarray(im).resize((24, 24), Image.BILINEAR)) for im in images])
    diff = (y.permute(0, 2, 3, 1) - torch.from_numpy(pil).float()).abs()
    assert diff.max() <= 1.0  # PIL rounds to uint8; the filters agree
    plain = resize_batch(x, 24).sub(x.mean()).abs().mean()
    naive = F.interpolate(x, size=(24, 24), mode="nearest").sub(x.mean()).abs().mean()
    assert plain < naive  # antialiasing averages pixels instead of picking them
    assert resize_batch(x, 32) is x


def test_crop_mode_option_reaches_the_training_augmentation_and_is_checked():
    from reslab.train.config import ConfigError, resolve_config

    aug = resolve_config({"crop_padding": 2, "crop_mode": "reflect", "flip": False}).batch_augment()
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = aug(x, torch.Generator().manual_seed(3))
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    # every crop is a window of the reflect-padded image: no zero fill, only pixels of the image itself
    assert all(any(torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
               for i in range(2))
    assert set(out.unique().tolist()) <= set(x.unique().tolist())
    assert resolve_config({"crop_padding": 2}).batch_augment().crop_mode == "constant"  # He et al.'s zeros
    with pytest.raises(ConfigError, match="--crop-mode"):
        resolve_config({"crop_mode": "wrap"})
    with pytest.raises(ValueError, match="crop_mode"):
        BatchAugment(crop_mode="wrap")
