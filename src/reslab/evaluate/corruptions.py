"""The 15 common corruptions of Hendrycks & Dietterich 2019 ("Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ImageNet-C / CIFAR-10-C), generated on the fly with numpy, Pillow and scipy.

Every corruption is a pure function of (image, severity 1..5, random generator). ``corrupt`` draws one
generator per (seed, corruption, image index), the same for all five severities, so a severity reuses the
random draws of the others and differs only in strength: the results are deterministic for a seed and the
distance to the clean image grows with severity.

Parameters follow the CIFAR-10-C generator of the paper's code (``make_cifar_c.py``), written for 32x32
images. Spatial extents (blur radii, motion length, shuffle distance, displacement, snow flake size) are
given in pixels at 32 px and multiplied by ``side / 32``, so 8x8 digits get proportionally gentler blurs and
224 px images roughly the ImageNet-C extents; intensities (noise, brightness, contrast, JPEG quality) do not
depend on size. Departures from the original code, each to avoid a download or a non-Python dependency, or
to make severities monotone:

- ``frost``: ImageNet-C blends crops of six frost photographs; here a frost texture is synthesised per image:
  a smooth haze (low-pass filtered noise) plus randomly oriented, branching ice needles drawn with Pillow,
  tinted blue-white. The blend ``keep * x + add * frost`` uses keep 0.95..0.75 and add 0.2..0.6 rising
  together (the paper's (1, 0.2) .. (0.75, 0.45) darken more than they add at severities 3-5, so the
  distance to the clean image would fall).
- ``motion_blur`` (and the snow streaks): ImageMagick's motion blur is replaced by a one-sided Gaussian line
  kernel of the same sigma at a random angle (``scipy.ndimage.convolve``).
- ``glass_blur``: the sequential pixel swaps become a vectorised local shuffle per iteration (a pixel takes
  the value of a random neighbour within ``max_delta``), applied to a fraction of the pixels that grows with
  severity (0.3, 0.5, 0.8, 1, 1) with iterations (1, 1, 1, 2, 3): jittering every pixel at severity 1 is
  already as far from the clean image as severity 5, which made the original non-monotone.
- ``elastic_transform``: CIFAR-10-C's five settings trade an affine part against the elastic part and are not
  monotone; here a smooth random displacement field (Simard et al. 2003) of RMS amplitude 0.5..2.5 px at
  32 px plus a random affine of 0.3..1.5 px grow together.
- ``fog``: the plasma fractal is the diamond-square construction with the paper's decay values, written anew.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)

# ---------------------------------------------------------------------------------------------------------
# Helpers (images are float32 H x W x C in [0, 1] inside this module)
# ---------------------------------------------------------------------------------------------------------


def _scale(x: np.ndarray) -> float:
    """Size factor relative to the 32 px images the parameters were written for."""
    return min(x.shape[0], x.shape[1]) / 32.0


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect") for c in range(x.shape[2])], axis=-1)


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The defocus kernel of ImageNet-C: a disk of ``radius`` px, softened by a Gaussian of ``alias_sigma``."""
    half = max(1, int(math.ceil(radius + 3 * alias_sigma)))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk = ndimage.gaussian_filter(disk, alias_sigma) if alias_sigma > 0 else disk
    return disk / disk.sum()


def _motion_kernel(sigma: float, angle_deg: float, max_length: float) -> np.ndarray:
    """A one-sided line kernel with Gaussian weights along ``angle`` (ImageMagick's -motion-blur in spirit)."""
    length = max(1.0, min(max_length, 3 * sigma))
    half = int(math.ceil(length)) + 1
    kernel = np.zeros((2 * half + 1, 2 * half + 1))
    dy, dx = math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))
    for t in np.linspace(0.0, length, int(4 * length) + 1):
        w = math.exp(-t * t / (2 * sigma * sigma))
        y, x = half + t * dy, half + t * dx
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        fy, fx = y - y0, x - x0  # bilinear splat, so sub-pixel sigmas still blur a little
        kernel[y0, x0] += w * (1 - fy) * (1 - fx)
        kernel[y0, x0 + 1] += w * (1 - fy) * fx
        kernel[y0 + 1, x0] += w * fy * (1 - fx)
        kernel[y0 + 1, x0 + 1] += w * fy * fx
    return kernel / kernel.sum()


def _clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom into the centre by ``zoom`` >= 1 and crop back to the original size."""
    h, w = x.shape[:2]
    ch, cw = max(1, int(math.ceil(h / zoom))), max(1, int(math.ceil(w / zoom)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top:top + ch, left:left + cw]
    out = ndimage.zoom(crop, (h / ch, w / cw) + (1,) * (x.ndim - 2), order=1, mode="nearest")
    return out[:h, :w]


def _grey(x: np.ndarray) -> np.ndarray:
    if x.shape[2] == 1:
        return x[..., 0]
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _pil_roundtrip(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    u8 = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)
    out = np.asarray(fn(im), dtype=np.float32) / 255.0
    return out[..., None] if out.ndim == 2 else out


# ---------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------


def gaussian_noise(x, severity, rng):
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + rng.standard_normal(x.shape).astype(np.float32) * c


def shot_noise(x, severity, rng):
    """Poisson noise with ``c`` photons at full intensity (fewer photons: noisier)."""
    c = (500, 250, 100, 75, 50)[severity - 1]
    return rng.poisson(np.clip(x, 0, 1) * c).astype(np.float32) / c


def impulse_noise(x, severity, rng):
    """Salt-and-pepper noise on a fraction ``c`` of the values (nested across severities)."""
    c = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    u = rng.random(x.shape)
    out = x.copy()
    out[u < c / 2] = 1.0
    out[(u >= c / 2) & (u < c)] = 0.0
    return out


# ---------------------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------------------


def defocus_blur(x, severity, rng):
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[severity - 1]
    s = _scale(x)
    return _convolve(x, _disk_kernel(radius * s, alias * s))


def glass_blur(x, severity, rng):
    """Blur, jitter pixels locally (as frosted glass), blur again.

    Each iteration moves a growing fraction of the pixels to a random neighbour within ``max_delta``
    (nested across severities), then the result is blurred with ``sigma``.
    """
    sigma, max_delta, iterations, moved = ((0.05, 1, 1, 0.3), (0.25, 1, 1, 0.5), (0.4, 1, 1, 0.8),
                                           (0.4, 1, 2, 1.0), (0.5, 1, 3, 1.0))[severity - 1]
    s = _scale(x)
    h, w = x.shape[:2]
    delta = max(1, int(round(max_delta * s)))
    x = _blur(x, sigma * s)
    rows, cols = np.mgrid[0:h, 0:w]
    # Draw the offsets and move masks of all 3 possible iterations, so that severities share them.
    offsets = rng.integers(-delta, delta + 1, size=(3, 2, h, w))
    chosen = rng.random((3, h, w)) < moved
    for i in range(iterations):
        r = np.clip(rows + offsets[i, 0] * chosen[i], 0, h - 1)
        c = np.clip(cols + offsets[i, 1] * chosen[i], 0, w - 1)
        x = x[r, c]
    return _blur(x, sigma * s)


def motion_blur(x, severity, rng):
    radius, sigma = ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0))[severity - 1]
    s = _scale(x)
    angle = rng.uniform(-45, 45)
    return _convolve(x, _motion_kernel(sigma * s, angle, radius * s))


def zoom_blur(x, severity, rng):
    """The mean of the image and its centre zooms by 1.01 .. ``max_zoom`` (step 0.01)."""
    max_zoom = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
    zooms = np.arange(1.01, max_zoom + 1e-9, 0.01)
    out = x.copy()
    for z in zooms:
        out += _clipped_zoom(x, float(z))
    return out / (len(zooms) + 1)


# ---------------------------------------------------------------------------------------------------------
# Weather
# ---------------------------------------------------------------------------------------------------------


def snow(x, severity, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95), (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))[severity - 1]
    s = _scale(x)
    h, w = x.shape[:2]
    flakes = loc + scale * rng.standard_normal((h, w, 1))
    angle = rng.uniform(-135, -45)
    flakes = _clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes = np.clip(_convolve(flakes, _motion_kernel(sigma * s * 0.5, angle, radius * s)), 0, 1)
    grey = _grey(x)[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, 2)


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frost texture, float (h, w, 3) in [0, 1]: haze plus branching ice needles.

    Stands in for the frost photographs of ImageNet-C: a low-frequency haze (Gaussian-filtered noise) gives
    the milky base, and randomly oriented needles with side branches at +-60 degrees (drawn at 2x and
    downsampled, so thin lines stay soft) give the crystal structure. Tinted slightly blue.
    """
    side = min(h, w)
    haze = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(1.0, 0.15 * side))
    haze = (haze - haze.min()) / max(1e-8, np.ptp(haze))
    canvas = Image.new("L", (2 * w, 2 * h))
    draw = ImageDraw.Draw(canvas)
    n_needles = max(4, int(h * w / 24))
    for _ in range(n_needles):
        x0, y0 = rng.uniform(0, 2 * w), rng.uniform(0, 2 * h)
        theta = rng.uniform(0, 2 * math.pi)
        length = 2 * side * rng.uniform(0.05, 0.3)
        bright = int(rng.uniform(120, 255))
        x1, y1 = x0 + length * math.cos(theta), y0 + length * math.sin(theta)
        draw.line([(x0, y0), (x1, y1)], fill=bright, width=1)
        for t in rng.uniform(0.2, 0.9, size=2):
            bx, by = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            for turn in (math.pi / 3, -math.pi / 3):
                bl = length * rng.uniform(0.1, 0.35)
                draw.line([(bx, by), (bx + bl * math.cos(theta + turn), by + bl * math.sin(theta + turn))],
                          fill=int(bright * 0.8), width=1)
    needles = np.asarray(canvas.resize((w, h), Image.BILINEAR), dtype=np.float64) / 255.0
    frost = np.clip(0.25 + 0.45 * haze + 1.2 * needles, 0, 1)
    return (frost[..., None] * np.array([0.86, 0.93, 1.0])).astype(np.float32)


def frost(x, severity, rng):
    keep, add = ((0.95, 0.2), (0.9, 0.3), (0.85, 0.4), (0.8, 0.5), (0.75, 0.6))[severity - 1]
    tex = frost_texture(x.shape[0], x.shape[1], rng)
    if x.shape[2] == 1:
        tex = tex.mean(2, keepdims=True)
    return keep * x + add * tex


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal noise on a ``size`` x ``size`` torus (``size`` a power of two), in [0, 1].

    The random displacement shrinks by ``decay`` per octave: larger decay, smoother fog.
    """
    grid = np.zeros((size, size))
    step, amplitude = size, 1.0
    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        # square step: centre of each square = mean of its 4 corners + noise
        centre = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(corners, (-1, -1), (0, 1))) / 4
        grid[half::step, half::step] = centre + amplitude * rng.uniform(-1, 1, centre.shape)
        centres = grid[half::step, half::step]
        # diamond step: edge midpoints = mean of the two corners and two centres around them + noise
        top = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)) / 4
        grid[0::step, half::step] = top + amplitude * rng.uniform(-1, 1, top.shape)
        left = (corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)) / 4
        grid[half::step, 0::step] = left + amplitude * rng.uniform(-1, 1, left.shape)
        step, amplitude = half, amplitude / decay
    grid -= grid.min()
    return grid / max(1e-12, grid.max())


def fog(x, severity, rng):
    strength, decay = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[severity - 1]
    h, w = x.shape[:2]
    size = 1 << int(math.ceil(math.log2(max(h, w, 2))))
    fractal = plasma_fractal(size, decay, rng)[:h, :w, None]
    top = x.max()
    return (x + strength * fractal) * top / (top + strength)


# ---------------------------------------------------------------------------------------------------------
# Digital
# ---------------------------------------------------------------------------------------------------------


def brightness(x, severity, rng):
    """Raise the HSV value channel by ``c`` (the grey level, for one-channel images).

    With hue and saturation fixed, RGB is proportional to the value V = max(R, G, B), so raising V to
    V' scales the pixel by V' / V (a black pixel becomes grey V').
    """
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    x = np.clip(x, 0, 1)
    if x.shape[2] == 1:
        return x + c
    value = x.max(axis=2, keepdims=True)
    raised = np.minimum(value + c, 1.0)
    return np.where(value > 0, x * raised / np.maximum(value, 1e-8), raised)


def contrast(x, severity, rng):
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = x.mean(axis=(0, 1, 2), keepdims=True)
    return (x - mean) * c + mean


def elastic_transform(x, severity, rng):
    amplitude, affine = ((0.5, 0.3), (1.0, 0.6), (1.5, 0.9), (2.0, 1.2), (2.5, 1.5))[severity - 1]
    s = _scale(x)
    h, w = x.shape[:2]
    # Smooth random displacement field, normalised to unit RMS so ``amplitude`` is in pixels (at 32 px).
    field = ndimage.gaussian_filter(rng.standard_normal((2, h, w)), sigma=(0, 2.0 * s, 2.0 * s))
    field /= max(1e-8, float(np.sqrt((field ** 2).mean())))
    # Random affine: a random 2x2 matrix perturbation of the identity around the centre.
    a = rng.uniform(-1, 1, size=(2, 2)) / max(h, w) * 2
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy = affine * s * (a[0, 0] * (rows - cy) + a[0, 1] * (cols - cx)) + amplitude * s * field[0]
    dx = affine * s * (a[1, 0] * (rows - cy) + a[1, 1] * (cols - cx)) + amplitude * s * field[1]
    coords = [rows + dy, cols + dx]
    return np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect")
                     for c in range(x.shape[2])], axis=-1)


def pixelate(x, severity, rng):
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w = x.shape[:2]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return _pil_roundtrip(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(x, severity, rng):
    quality = (80, 65, 58, 50, 40)[severity - 1]

    def roundtrip(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)

    return _pil_roundtrip(x, roundtrip)


# ---------------------------------------------------------------------------------------------------------
# Registry and the batch entry point
# ---------------------------------------------------------------------------------------------------------

CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog,
    "brightness": brightness, "contrast": contrast, "elastic_transform": elastic_transform,
    "pixelate": pixelate, "jpeg_compression": jpeg_compression,
}
CATEGORIES = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
              "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
              "weather": ("snow", "frost", "fog"),
              "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")}


def corrupt(images: np.ndarray, name: str, severity: int, *, seed: int = 0, first_index: int = 0) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, C) or one image (H, W, C); returns uint8 of the same shape.

    Image ``i`` uses a generator seeded by (seed, corruption, first_index + i), independent of the severity.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {batch.dtype} {batch.shape}")
    fn, code = CORRUPTIONS[name], list(CORRUPTIONS).index(name)
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        rng = np.random.default_rng((seed, code, first_index + i))
        result = fn(image.astype(np.float32) / 255.0, severity, rng)
        out[i] = np.clip(np.rint(np.asarray(result, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    return out[0] if single else out
