"""Data sources: scikit-learn digits, CIFAR python pickles, and image folders.

Every source ends in the same place: uint8 arrays (N, H, W, C) with int64 labels, wrapped in
:class:`ImageArray` per split and :class:`DataSplits` for the whole data set, so the loader and
the trainer never special-case a format.

``load_data(spec)`` picks the source from the spec string:

* ``"digits"``: the 1,797 real 8x8 handwritten digits of scikit-learn's ``load_digits``.
* ``"cifar10:DIR"`` / ``"cifar100:DIR"``: the official python-pickle batches.
* any other string: a folder in ImageFolder layout, decoded once into a cache (see
  :mod:`reslab.data.cache`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import cache as _cache

__all__ = [
    "ImageArray",
    "DataSplits",
    "load_data",
    "load_digits",
    "load_cifar",
    "load_folder",
    "stratified_split",
    "channel_stats",
    "decode_image",
    "decode_files",
    "ImageDecodeError",
    "ImageTooLargeError",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Fraction of a single class-folder tree held out as the test split.
FOLDER_TEST_FRACTION = 0.2
# Below this many files a process pool costs more than it saves.
MIN_FILES_FOR_POOL = 64


# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------
@dataclass
class ImageArray:
    """One decoded split."""

    images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}; may be a read-only np.memmap
    labels: np.ndarray  # int64 (N,)
    files: list[str] | None = None  # source paths relative to the data root; None for array sources

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> "ImageArray":
        """The rows ``index`` (copied into memory)."""
        index = np.asarray(index, dtype=np.int64)
        files = [self.files[i] for i in index] if self.files is not None else None
        return ImageArray(np.ascontiguousarray(self.images[index]), self.labels[index].copy(), files)


@dataclass
class DataSplits:
    """A data set: class names, train/val/test splits and the train normalisation statistics."""

    name: str  # the spec string given to load_data
    classes: list[str]
    train: ImageArray
    val: ImageArray | None
    test: ImageArray
    mean: tuple[float, ...]  # per-channel mean of the train images, in [0, 1]
    std: tuple[float, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[1]), int(self.train.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep, held_out)`` with ``fraction`` of every class held out.

    Each class with at least two samples keeps at least one and holds out at least one, so a
    small class is never missing from either side. Deterministic in ``seed``; both index
    arrays are sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held.append(idx[:n])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep.astype(np.int64), held_out.astype(np.int64)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images (N, H, W, C), in [0, 1].

    Uses a 256-bin histogram per channel, read in chunks so a memmap never has to fit in memory.
    """
    c = images.shape[-1]
    hist = np.zeros((c, 256), dtype=np.int64)
    for i in range(0, images.shape[0], chunk):
        block = np.asarray(images[i : i + chunk]).reshape(-1, c)
        for ch in range(c):
            hist[ch] += np.bincount(block[:, ch], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = np.maximum(hist.sum(axis=1), 1)
    mean = (hist * values).sum(axis=1) / total
    var = (hist * values**2).sum(axis=1) / total - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel must not divide by zero
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _conform_array(images: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    """Bring in-memory uint8 images (N, H, W, C) to ``channels`` and a square ``image_size``."""
    if channels is not None and channels != images.shape[-1]:
        if channels == 1:  # ITU-R 601-2 luma, the same weights as Pillow's "L" conversion
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            images = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
        elif channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:
            raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        images = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return np.ascontiguousarray(images)


def _finish(
    name: str,
    classes: list[str],
    train: ImageArray,
    test: ImageArray,
    val: ImageArray | None,
    val_fraction: float,
    seed: int,
    skipped: list[tuple[str, str]] | None = None,
    train_stats: tuple[list[float], list[float]] | None = None,
) -> DataSplits:
    """Carve the validation split from train if asked, and compute the train statistics
    (``train_stats`` are reused when train is not re-carved)."""
    if val is None and val_fraction > 0:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        # A seed stream distinct from the one that split test off a single folder.
        keep, held = stratified_split(train.labels, val_fraction, seed + 1_000_003)
        train, val = train.subset(keep), train.subset(held)
        train_stats = None
    if train_stats is not None:
        mean, std = tuple(map(float, train_stats[0])), tuple(map(float, train_stats[1]))
    else:
        mean, std = channel_stats(train.images)
    return DataSplits(name, classes, train, val, test, mean, std, list(skipped or []))


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------
def load_digits(
    *, val_fraction: float = 0.0, seed: int = 0, image_size: int | None = None, channels: int | None = None,
    name: str = "digits",
) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits, values 0..16 scaled to 0..255).

    The train/test split is a fixed stratified 80/20 split with seed 0, independent of ``seed``,
    so the test set never changes between runs; ``seed`` only moves the validation carve-out.
    The native size is 8x8 with one channel: the CIFAR-style ResNets run on it as is (global
    pooling makes them size-agnostic), and ``image_size`` upsamples (bilinear) when a model
    needs larger inputs.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    images = _conform_array(images, image_size, channels)
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    classes = [str(i) for i in range(10)]
    train = ImageArray(images[train_idx], labels[train_idx], None)
    test = ImageArray(images[test_idx], labels[test_idx], None)
    return _finish(name, classes, train, test, None, val_fraction, seed)


# --------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------
_CIFAR_LAYOUT = {
    # kind: (sub-folder name, train files, test files, meta file, label key, names key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(
    kind: str, root: str | Path, *, val_fraction: float = 0.0, seed: int = 0, image_size: int | None = None,
    channels: int | None = None, name: str | None = None,
) -> DataSplits:
    """CIFAR-10/100 from the official python pickles (Krizhevsky 2009).

    ``root`` is the folder holding the batches (``cifar-10-batches-py`` / ``cifar-100-python``)
    or its parent. CIFAR-100 uses the 100 fine labels.
    """
    if kind not in _CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR kind {kind!r}; expected one of {sorted(_CIFAR_LAYOUT)}")
    sub, train_files, test_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[kind]
    root = Path(root).expanduser()
    folder = root if (root / meta_file).is_file() else root / sub
    if not (folder / meta_file).is_file():
        raise FileNotFoundError(f"{kind}: no {meta_file!r} in {root} or {root / sub}")

    def read(files: list[str]) -> ImageArray:
        images, labels = [], []
        for fname in files:
            path = folder / fname
            if not path.is_file():
                raise FileNotFoundError(f"{kind}: missing batch file {path}")
            batch = _unpickle(path)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        x = _conform_array(np.concatenate(images), image_size, channels)
        return ImageArray(x, np.concatenate(labels), None)

    meta = _unpickle(folder / meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    return _finish(name or f"{kind}:{root}", classes, read(train_files), read(test_files), None, val_fraction, seed)


# --------------------------------------------------------------------------------------
# Image folders: decoding
# --------------------------------------------------------------------------------------
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _is_colour(im: Image.Image) -> bool:
    """Whether an opened image carries colour (judged from its mode; palettes are inspected)."""
    if im.mode in _GRAY_MODES:
        return False
    if im.mode in ("P", "PA"):
        palette = im.getpalette() or []
        rgb = np.asarray(palette[: len(palette) // 3 * 3], dtype=np.int64).reshape(-1, 3)
        return bool((rgb != rgb[:, :1]).any())
    return True


def _to_8bit(im: Image.Image) -> Image.Image:
    """Integer/float single-channel modes to "L": 16-bit (I;16*, I) is scaled by 255/65535,
    float (F) is taken as already 0..255."""
    arr = np.asarray(im)
    if im.mode == "F":
        out = np.clip(np.rint(arr), 0, 255)
    else:
        out = np.clip(np.rint(arr.astype(np.float64) * (255.0 / 65535.0)), 0, 255)
    return Image.fromarray(out.astype(np.uint8), "L")


def _normalise_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to "L" (channels=1) or "RGB" (channels=3).

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited over a white
    background, so a transparent glyph on nothing looks like ink on paper rather than on black.
    CMYK, YCbCr, LAB and HSV go through Pillow's RGB conversion; 16-bit grey is scaled to 8-bit.
    """
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        im = _to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if im.mode != target:
        im = im.convert(target)
    return im


def _resize_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers ``size`` (H, W) keeping its aspect ratio, then centre-crop."""
    h, w = size
    if im.size == (w, h):
        return im
    scale = max(h / im.height, w / im.width)
    new_w, new_h = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return im.crop((left, top, left + w, top + h))


class ImageDecodeError(ValueError):
    """A file cannot be decoded as an image; ``reason`` is the decoder's complaint, the message names the file."""

    def __init__(self, path, reason: str):
        self.path = str(path) if isinstance(path, (str, os.PathLike)) else "<uploaded data>"
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}; is it truncated, corrupt or not an image? "
                         "(replace or remove it)")


class ImageTooLargeError(ImageDecodeError, Image.DecompressionBombError):
    """More pixels than the decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` or ``max_pixels``)."""


def decode_image(path: str | Path, size: tuple[int, int], channels: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode one file to uint8 (H, W, C) at ``size`` (H, W) with ``channels`` (1 or 3).

    JPEGs are decoded with ``Image.draft``, which lets libjpeg scale by 1/2, 1/4 or 1/8 while
    decoding (never below the size needed), far faster than a full decode for large photos.
    Anything unreadable raises :class:`ImageDecodeError` (a ValueError naming the file), and an
    image larger than ``max_pixels`` (the decompression-bomb limit) :class:`ImageTooLargeError`;
    whatever exception the decoder threw is only in the message, so callers handle one type.
    """
    try:
        return _decode_image(path, size, channels, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(path, _reason(exc)) from None
    except ImageDecodeError:
        raise
    except Exception as exc:  # every decoder failure (OSError, SyntaxError, struct.error, ...) is the file's fault
        raise ImageDecodeError(path, _reason(exc)) from None


def _decode_image(path, size: tuple[int, int], channels: int, max_pixels: int | None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels exceeds the limit {max_pixels}")
            if im.format == "JPEG":
                h, w = size
                scale = max(h / im.height, w / im.width)
                im.draft("L" if channels == 1 else "RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            im.load()
            im = _resize_crop(_normalise_mode(im, channels), size)
            arr = np.asarray(im, dtype=np.uint8)
    return arr.reshape(size[0], size[1], channels)


def _probe_image(path: str, max_pixels: int | None) -> tuple[tuple[int, int], bool]:
    """``((H, W), is_colour)`` from the header alone (no pixel decode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels exceeds the limit {max_pixels}")
            return (im.height, im.width), _is_colour(im)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _probe_chunk(args):
    root, relpaths, max_pixels = args
    out = []
    for rel in relpaths:
        try:
            out.append(_probe_image(os.path.join(root, rel), max_pixels))
        except Exception as exc:  # any unreadable file is skipped, never fatal
            out.append(_reason(exc))
    return out


def _decode_chunk(args):
    """Worker: decode a list of files; returns (stacked images of the good ones, ok mask, errors)."""
    root, relpaths, size, channels, max_pixels = args
    good, ok, errors = [], np.zeros(len(relpaths), bool), {}
    for i, rel in enumerate(relpaths):
        try:
            good.append(decode_image(os.path.join(root, rel), size, channels, max_pixels))
            ok[i] = True
        except ImageDecodeError as exc:
            errors[i] = exc.reason
    images = np.stack(good) if good else np.zeros((0, size[0], size[1], channels), np.uint8)
    return images, ok, errors


def _map_chunks(fn, tasks: list, workers: int, n_files: int, progress: bool, desc: str, count):
    """Run ``fn`` over ``tasks`` in order, in a process pool when it pays, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=n_files, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or n_files < MIN_FILES_FOR_POOL or len(tasks) == 1:
            for task in tasks:
                result = fn(task)
                bar.update(count(task))
                yield result
            return
        # fork: workers inherit the imported modules, so start-up is instant (they only use
        # Pillow and numpy, never torch or CUDA).
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(processes=min(workers, len(tasks))) as pool:
            for task, result in zip(tasks, pool.imap(fn, tasks)):
                bar.update(count(task))
                yield result
    finally:
        bar.close()


def _chunks(items: list, workers: int) -> list[list]:
    size = max(1, min(256, math.ceil(len(items) / max(1, workers * 4))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def probe_files(root: Path, relpaths: list[str], *, workers: int, progress: bool, max_pixels: int | None):
    """Header pass over ``relpaths``: a list with ``((H, W), is_colour)`` or an error string per file."""
    tasks = [(str(root), chunk, max_pixels) for chunk in _chunks(relpaths, workers)]
    results: list = []
    for part in _map_chunks(_probe_chunk, tasks, workers, len(relpaths), progress, "scan", lambda t: len(t[1])):
        results.extend(part)
    return results


def decode_files(
    root: Path, relpaths: list[str], out: np.ndarray, size: tuple[int, int], channels: int, *,
    workers: int, progress: bool, max_pixels: int | None, desc: str = "decode",
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode ``relpaths`` (in parallel, in chunks) into consecutive rows of ``out``.

    Returns ``(ok, errors)``: a boolean mask of the files that decoded (their images fill
    ``out[:ok.sum()]`` in order) and ``{file index: reason}`` for the ones that did not.
    """
    chunks = _chunks(relpaths, workers)
    tasks = [(str(root), chunk, size, channels, max_pixels) for chunk in chunks]
    ok = np.zeros(len(relpaths), bool)
    errors: dict[int, str] = {}
    start = cursor = 0
    for (images, chunk_ok, chunk_errors), chunk in zip(
        _map_chunks(_decode_chunk, tasks, workers, len(relpaths), progress, desc, lambda t: len(t[1])), chunks
    ):
        out[cursor : cursor + len(images)] = images
        cursor += len(images)
        ok[start : start + len(chunk)] = chunk_ok
        errors.update({start + i: msg for i, msg in chunk_errors.items()})
        start += len(chunk)
    return ok, errors


# --------------------------------------------------------------------------------------
# Image folders: layout, decode rules, cache
# --------------------------------------------------------------------------------------
def _class_dirs(folder: Path) -> list[str]:
    try:
        return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError as err:
        _cache.raise_unreadable(err)


def _scan_split(root: Path, split_dir: str, classes: list[str]) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """Files of one split in class order: (relative paths, labels, skipped non-image files)."""
    base = root / split_dir if split_dir else root
    files, labels, skipped = [], [], []
    present = _class_dirs(base)
    unknown = [c for c in present if c not in classes]
    if unknown:
        where = f"{split_dir}/" if split_dir else str(base)
        raise ValueError(
            f"class folder(s) {unknown} in {where} have no counterpart in the training split; "
            f"training classes are {classes}"
        )
    for label, cls in enumerate(classes):
        cdir = base / cls
        if not cdir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True, onerror=_cache.raise_unreadable):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            prefix = os.path.relpath(dirpath, root).replace(os.sep, "/") + "/"
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                rel = prefix + fname
                if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(rel)
                    labels.append(label)
                else:
                    skipped.append((rel, "not an image file extension"))
    return files, labels, skipped


def _folder_layout(root: Path) -> dict[str, str]:
    """Map of split name to sub-folder: train/test(/val), train/val (val becomes test) or one tree ("all")."""
    has = {name: (root / name).is_dir() for name in ("train", "test", "val")}
    if has["train"] and has["test"]:
        layout = {"train": "train", "test": "test"}
        if has["val"]:
            layout["val"] = "val"
        return layout
    if has["train"] and has["val"]:
        return {"train": "train", "test": "val"}
    if has["train"] or has["test"]:
        raise ValueError(f"{root} has a train/ or test/ folder but not both (a val/ folder can stand in for test/)")
    return {"all": ""}


def load_folder(
    root: str | Path, *, val_fraction: float = 0.0, seed: int = 0, image_size: int | None = None,
    channels: int | None = None, cache_dir: str | Path | None = None, progress: bool = True,
    workers: int | None = None, name: str | None = None,
) -> DataSplits:
    """An ImageFolder tree (``root/<class>/<image>``), decoded once into a uint8 cache.

    Layout: ``root/train`` + ``root/test`` (plus ``root/val`` if present) are used as given;
    ``root/train`` + ``root/val`` uses val as the test split; otherwise ``root`` itself holds the
    class folders and a stratified 20 % test split is drawn with ``seed``. Classes are the sorted
    class-folder names of the training split (nested sub-folders are included); a class folder
    that exists only in test/val is an error. Extensions: jpg, jpeg, png, bmp, gif, webp, tif,
    tiff (any case); GIFs use their first frame.

    Decode rules, fixed by the training images (for a single tree: by all its images, so the
    cache does not depend on ``seed``):

    * channels: ``channels`` if given, else 3 if any training image is colour (by its mode; a
      palette counts as colour only if it has non-grey entries) and 1 otherwise. Alpha is
      composited over white, CMYK goes through Pillow's RGB conversion, 16-bit grey is scaled
      to 8-bit.
    * size: ``(image_size, image_size)`` if given, else the most common (H, W) among the training
      images; other sizes are resized (bilinear) so their shorter side fits, then centre-cropped.

    Files that cannot be decoded (truncated, corrupt, empty, not an image, over
    ``Image.MAX_IMAGE_PIXELS``) and files without an image extension are skipped and listed
    in ``DataSplits.skipped``; if no training image decodes, a ValueError says so.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    workers = max(1, int(workers or os.cpu_count() or 1))
    max_pixels = Image.MAX_IMAGE_PIXELS
    layout = _folder_layout(root)
    first = "train" if "train" in layout else "all"
    classes = _class_dirs(root / layout[first]) if layout[first] else _class_dirs(root)
    if not classes:
        raise ValueError(f"no class folders found in {root / layout[first]}")

    options = {"image_size": image_size, "channels": channels, "max_pixels": max_pixels, "layout": layout}
    listing = _cache.folder_listing(root, [d for d in layout.values() if d] or None)
    key = _cache.cache_key(listing, options)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else _cache.default_cache_dir()
    entry_dir = cache_root / "folders" / f"{root.name or 'root'}-{key}"

    manifest = _cache.read_entry(entry_dir)
    if manifest is None:
        if entry_dir.exists():  # an entry from another cache version: replace it
            shutil.rmtree(entry_dir, ignore_errors=True)
        _decode_folder(root, layout, classes, entry_dir, image_size, channels, workers, progress, max_pixels)
        manifest = _cache.read_entry(entry_dir)
        assert manifest is not None

    splits = {s: ImageArray(*_cache.load_split(entry_dir, s)) for s in manifest["splits"]}
    skipped = [tuple(s) for s in manifest["skipped"]]
    train_stats = None
    if "all" in splits:
        train_idx, test_idx = stratified_split(splits["all"].labels, FOLDER_TEST_FRACTION, seed)
        train, test, val = splits["all"].subset(train_idx), splits["all"].subset(test_idx), None
    else:
        train, test, val = splits["train"], splits["test"], splits.get("val")
        stats = manifest["splits"]["train"]
        train_stats = (stats["mean"], stats["std"])
        if val is not None and val_fraction > 0:
            warnings.warn(f"{root} has a val/ folder; it is used and val_fraction={val_fraction} is ignored")
    return _finish(name or str(root), classes, train, test, val, val_fraction, seed, skipped, train_stats)


def _decode_folder(root, layout, classes, entry_dir, image_size, channels, workers, progress, max_pixels) -> None:
    """Scan, fix the decode rules from the training split, decode every split into a cache entry."""
    scanned = {split: _scan_split(root, sub, classes) for split, sub in layout.items()}
    skipped: list[tuple[str, str]] = []
    for _, _, bad in scanned.values():
        skipped.extend(bad)
    first = "train" if "train" in scanned else "all"
    present = set(scanned[first][1])
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty and scanned[first][0]:
        where = root / layout[first] if layout[first] else root
        raise ValueError(f"class folder(s) {empty} in {where} hold no image files "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder(s)")

    # Header pass over the training files, only for the rules not fixed by the caller.
    probe_failed: dict[str, str] = {}
    if image_size is None or channels is None:
        train_files = scanned[first][0]
        infos = probe_files(root, train_files, workers=workers, progress=progress, max_pixels=max_pixels)
        sizes = Counter()
        colour = False
        for rel, info in zip(train_files, infos):
            if isinstance(info, str):
                probe_failed[rel] = info
                continue
            sizes[info[0]] += 1
            colour = colour or info[1]
        if not sizes:
            raise ValueError(_all_failed_message(root, first, train_files, probe_failed))
        # Most common size; ties go to the larger image so nothing is upsampled needlessly.
        size = max(sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1], kv[0]))[0]
        if image_size is not None:
            size = (image_size, image_size)
        if channels is None:
            channels = 3 if colour else 1
    else:
        size = (image_size, image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")

    with _cache.CacheEntry(entry_dir.parent, entry_dir.name) as entry:
        meta_splits = {}
        for split, (files, labels, _) in scanned.items():
            todo = [(f, y) for f, y in zip(files, labels) if f not in probe_failed]
            skipped.extend((f, probe_failed[f]) for f in files if f in probe_failed)
            out = entry.allocate(split, len(todo), (size[0], size[1], channels))
            rels = [f for f, _ in todo]
            ok, errors = decode_files(
                root, rels, out, size, channels, workers=workers, progress=progress, max_pixels=max_pixels,
                desc=f"decode {split}",
            )
            skipped.extend((rels[i], msg) for i, msg in sorted(errors.items()))
            good_files = [f for f, keep in zip(rels, ok) if keep]
            good_labels = np.asarray([y for (_, y), keep in zip(todo, ok) if keep], dtype=np.int64)
            if split == first and not good_files:
                raise ValueError(_all_failed_message(root, split, files, dict(skipped)))
            if split == first:
                lost = [c for i, c in enumerate(classes) if not (good_labels == i).any()]
                if lost:
                    reasons = dict(skipped)
                    examples = "; ".join(f"{f}: {reasons.get(f, '?')}" for f, y in zip(files, labels)
                                         if classes[y] in lost)
                    raise ValueError(f"no image of class(es) {lost} in the {split!r} split of {root} could be "
                                     f"decoded (e.g. {examples[:300]}); fix or replace those files")
            mean, std = channel_stats(out[: len(good_files)])
            entry.finish_split(split, good_labels, good_files, len(good_files))
            meta_splits[split] = {"n": len(good_files), "shape": [size[0], size[1], channels], "mean": mean, "std": std}
        skipped.sort()
        entry.commit(
            {
                "source": str(root),
                "classes": classes,
                "layout": layout,
                "image_size": list(size),
                "channels": channels,
                "splits": meta_splits,
                "skipped": skipped,
            }
        )


def _all_failed_message(root: Path, split: str, files: list[str], errors: dict[str, str]) -> str:
    if not files:
        return f"no image files found in the {split!r} split of {root}"
    examples = "; ".join(f"{f}: {errors.get(f, '?')}" for f in files[:3])
    return f"none of the {len(files)} image files in the {split!r} split of {root} could be decoded (e.g. {examples})"


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def load_data(
    spec: str, *, val_fraction: float = 0.0, seed: int = 0, image_size: int | None = None,
    channels: int | None = None, cache_dir: str | Path | None = None, progress: bool = True,
    workers: int | None = None,
) -> DataSplits:
    """Load a data set by spec: ``"digits"``, ``"cifar10:DIR"``, ``"cifar100:DIR"`` or a folder path.

    ``val_fraction`` carves a stratified validation split out of train (with ``seed``);
    ``image_size``/``channels`` resize/convert the stored images (folders: at decode time);
    ``cache_dir``, ``progress`` and ``workers`` only concern folder decoding.
    """
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        return load_digits(val_fraction=val_fraction, seed=seed, image_size=image_size, channels=channels, name=spec)
    if kind in _CIFAR_LAYOUT and rest:
        return load_cifar(
            kind, rest, val_fraction=val_fraction, seed=seed, image_size=image_size, channels=channels, name=spec
        )
    if not Path(spec).expanduser().is_dir():
        raise FileNotFoundError(
            f"unknown data spec {spec!r}: expected 'digits', 'cifar10:DIR', 'cifar100:DIR' or an existing folder"
        )
    return load_folder(
        spec, val_fraction=val_fraction, seed=seed, image_size=image_size, channels=channels, cache_dir=cache_dir,
        progress=progress, workers=workers, name=spec,
    )
