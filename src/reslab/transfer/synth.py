"""Synthetic glyph images: a small labelled data set for any script whose font is installed.

"Deep Aramaic" (Aioanei et al. 2023, "Deep Aramaic: Towards a synthetic data paradigm enabling machine learning in
epigraphy") trains a ResNet on letters rendered from fonts and then degraded like inscriptions: stone texture,
lighting, erosion and damage, blur, noise and perspective. ``render_glyph`` does the same at small scale:
1. the letter is drawn from a font at a random size, position and rotation, on a 4x supersampled canvas;
2. a random perspective warp (the camera is not square to the stone);
3. erosion or dilation of the strokes, chipped-off blobs and cracks (weathering and damage);
4. a low-frequency texture tinted like stone, with the letter carved (darker) into it;
5. a linear lighting gradient from a random direction; Gaussian blur; downsampling; sensor noise.
Every image has its own generator seeded with (seed, class, index), so the set is identical for a seed whatever
the order of generation. Output is an ImageFolder (``train/<class>/*.png``, ``test/<class>/*.png``) plus
``glyphs.json``; ``reslab train --data DIR`` reads it directly.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Named alphabets: (characters, a hint to find the font file of the script).
ALPHABETS: dict[str, tuple[str, str]] = {
    "latin": ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", ""),
    "digits": ("0123456789", ""),
    "greek": ("".join(chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2), ""),  # capital alpha..omega
    "hebrew": ("".join(chr(c) for c in range(0x5D0, 0x5EB) if c not in (0x5DA, 0x5DD, 0x5DF, 0x5E3, 0x5E5)),
               "hebrew"),  # the 22 letters, final forms left out
    "phoenician": ("".join(chr(c) for c in range(0x10900, 0x10916)), "phoenician"),  # 22 letters
    "aramaic": ("".join(chr(c) for c in range(0x10840, 0x10856)), "imperialaramaic"),  # Imperial Aramaic, 22
}
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
SUPERSAMPLE = 4  # render at 4x the output side, then downsample: smooth strokes and sub-pixel jitter
MAX_FONTS = 8  # several fonts of a script add style variety; a cap keeps the set comparable across machines


def resolve_alphabet(spec: str) -> tuple[str, str]:
    """Characters and a font hint for a named alphabet (``hebrew``, ``aramaic``, ...) or literal characters."""
    if spec.lower() in ALPHABETS:
        return ALPHABETS[spec.lower()]
    chars = "".join(dict.fromkeys(c for c in spec if not c.isspace()))  # unique, in order
    if len(chars) < 2:
        raise ValueError(f"--alphabet {spec!r}: give a named alphabet ({', '.join(ALPHABETS)}) or at least two "
                         "characters")
    return chars, ""


def installed_fonts() -> list[Path]:
    """TrueType/OpenType files in the usual font folders, sorted (what ``fc-list`` would list)."""
    files = set()
    for d in FONT_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            files.update(p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return sorted(files)


def _missing_mask(font: ImageFont.FreeTypeFont) -> bytes:
    # A code point no font maps: what the font draws for a missing glyph (its .notdef box, or nothing).
    return bytes(font.getmask("\U0010fffd"))


def font_covers(font: ImageFont.FreeTypeFont, chars: str) -> bool:
    """Whether ``font`` draws a real glyph (not the missing-glyph box) for every character."""
    notdef = _missing_mask(font)
    for c in chars:
        mask = font.getmask(c)
        if mask.getbbox() is None or bytes(mask) == notdef:
            return False
    return True


def find_fonts(chars: str, hint: str = "", font: str | Path | None = None) -> list[str]:
    """Font files able to draw ``chars``: ``font`` if given; else installed fonts (those whose file name has the
    script ``hint`` first), up to MAX_FONTS; else Pillow's built-in font ("<pillow-default>") when it covers them."""
    if font is not None:
        path = Path(font).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--font {font}: no such file (fc-list lists the installed fonts)")
        if not font_covers(ImageFont.truetype(str(path), 32), chars):
            raise ValueError(f"--font {font} cannot draw all of {chars!r}")
        return [str(path)]
    candidates = installed_fonts()
    hinted = [p for p in candidates if hint and hint in p.name.lower().replace("-", "")]
    found = []
    for path in hinted + [p for p in candidates if p not in hinted]:
        if found and hinted and path not in hinted:
            break  # the script's own fonts are enough; no need to open every other font file
        try:
            if font_covers(ImageFont.truetype(str(path), 32), chars):
                found.append(str(path))
        except OSError:
            continue
        if len(found) >= MAX_FONTS:
            break
    if found:
        return found
    if font_covers(ImageFont.load_default(size=32), chars):
        return ["<pillow-default>"]
    raise ValueError(f"no installed font draws {chars[:10]!r}...; install one (e.g. `apt-get install fonts-noto-core` "
                     "for Hebrew, Phoenician, Imperial Aramaic) or pass --font FILE")


def _load_font(name: str, size: int, cache: dict) -> ImageFont.FreeTypeFont:
    key = (name, size)
    if key not in cache:
        cache[key] = ImageFont.load_default(size=size) if name == "<pillow-default>" else ImageFont.truetype(name, size)
    return cache[key]


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """The 8 coefficients PIL's PERSPECTIVE transform needs to map output corners ``dst`` to input ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, dtype=np.float64), src.reshape(8).astype(np.float64)).tolist()


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid upsampled bicubically (a cheap stone texture)."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0


def render_glyph(char: str, fonts: Sequence[str], size: int, rng: np.random.Generator,
                 font_cache: dict | None = None) -> np.ndarray:
    """One degraded image of ``char``, uint8 (size, size, 3); all randomness from ``rng``."""
    cache = {} if font_cache is None else font_cache
    side = size * SUPERSAMPLE

    # 1. the letter: font, size, position, rotation
    font = _load_font(fonts[int(rng.integers(len(fonts)))], int(side * rng.uniform(0.5, 0.75)), cache)
    mask = Image.new("L", (side, side), 0)
    centre = side / 2 + rng.uniform(-0.08, 0.08, size=2) * side
    ImageDraw.Draw(mask).text(tuple(centre), char, fill=255, font=font, anchor="mm")
    mask = mask.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, center=tuple(centre))

    # 2. perspective: each corner moves by up to 10 % of the side
    corners = np.array([[0, 0], [side, 0], [side, side], [0, side]], dtype=np.float64)
    moved = corners + rng.uniform(-0.1, 0.1, size=(4, 2)) * side
    mask = mask.transform((side, side), Image.PERSPECTIVE, _perspective_coeffs(moved, corners), Image.BILINEAR)

    # 3. weathering: thinner or thicker strokes, chips and cracks
    k = int(rng.choice([0, 3, 5]))
    if k:  # erosion by at most 1 output pixel, so thin fonts keep their strokes
        mask = mask.filter(ImageFilter.MinFilter(3) if rng.random() < 0.5 else ImageFilter.MaxFilter(k))
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(0, 4))):  # chipped-off blobs
        r = rng.uniform(0.02, 0.07) * side
        x, y = rng.uniform(0.2, 0.8, size=2) * side
        draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
    crack_mask = Image.new("L", (side, side), 0)
    for _ in range(int(rng.integers(0, 3))):  # cracks run through stone and letter alike
        pts = [tuple(p) for p in rng.uniform(0, 1, size=(3, 2)) * side]
        ImageDraw.Draw(crack_mask).line(pts, fill=255, width=int(rng.integers(2, 6)))
    ink = np.asarray(mask, dtype=np.float32) / 255.0
    cracks = np.asarray(crack_mask, dtype=np.float32) / 255.0

    # 4. texture: tinted low-frequency stone, the letter carved darker into it
    stone = 0.55 * _smooth_noise(rng, side, 6) + 0.3 * _smooth_noise(rng, side, 24) + 0.15 * rng.random((side, side))
    tint = (0.7 + 0.3 * rng.uniform(0.0, 1.0, size=3)) * rng.uniform(0.65, 1.0)  # greyish: limestone to basalt
    surface = (0.35 + 0.65 * stone)[..., None] * tint  # (side, side, 3) in [0, 1]
    carve = rng.uniform(0.15, 0.5)  # how much darker the carved strokes are
    img = surface * (1 - (1 - carve) * ink[..., None]) * (1 - 0.5 * cracks[..., None])

    # 5. lighting from a random direction, blur, downsampling, noise
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.45)
    yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
    img = img * (1 + strength * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8), "RGB")
    pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.0) * SUPERSAMPLE)))
    small = np.asarray(pil.resize((size, size), Image.BOX), dtype=np.float32)
    small = small + rng.normal(0, rng.uniform(0, 6), size=small.shape)
    return np.clip(small, 0, 255).astype(np.uint8)


def _class_name(index: int, char: str) -> str:
    try:
        word = unicodedata.name(char).split()[-1].lower()
    except ValueError:
        word = f"u{ord(char):04x}"
    safe = "".join(c if c.isalnum() else "_" for c in word)
    return f"{index:02d}_{safe}"


def synth_glyphs(alphabet: str, out: str | Path, *, n_per_class: int = 100, size: int = 32, seed: int = 0,
                 font: str | Path | None = None, test_fraction: float = 0.2) -> dict[str, Any]:
    """``reslab synth glyphs``: render ``n_per_class`` degraded images of every letter of ``alphabet`` into an
    ImageFolder at ``out`` (``test_fraction`` of each class in ``test/``). Returns what ``glyphs.json`` records."""
    chars, hint = resolve_alphabet(alphabet)
    if n_per_class < 2:
        raise ValueError(f"--n-per-class {n_per_class}: need at least 2 (one train, one test image)")
    if size < 8:
        raise ValueError(f"--size {size}: need at least 8 pixels")
    fonts = find_fonts(chars, hint, font)
    out = Path(out)
    if (out / "train").exists() and any((out / "train").iterdir()):
        raise ValueError(f"--out {out} already holds a data set; choose another folder")
    n_test = min(n_per_class - 1, max(1, int(round(test_fraction * n_per_class))))
    cache: dict = {}
    classes = []
    for ci, ch in enumerate(chars):
        name = _class_name(ci, ch)
        classes.append({"name": name, "char": ch, "codepoint": f"U+{ord(ch):04X}"})
        for split in ("train", "test"):
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, ci, i])
            image = render_glyph(ch, fonts, size, rng, cache)
            split = "test" if i < n_test else "train"
            Image.fromarray(image).save(out / split / name / f"{i:05d}.png", optimize=False)
    info = {"alphabet": alphabet, "characters": chars, "classes": classes, "fonts": fonts, "size": size,
            "seed": seed, "n_per_class": n_per_class, "train_per_class": n_per_class - n_test,
            "test_per_class": n_test}
    (out / "glyphs.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return {**info, "out": str(out)}
