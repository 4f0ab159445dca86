"""Synthetic glyphs (Deep Aramaic style): deterministic for a seed, an ImageFolder reslab reads, any font."""
import json

import numpy as np
import pytest

from reslab.data import load_data
from reslab.transfer import synth
from reslab.transfer.synth import find_fonts, render_glyph, resolve_alphabet, synth_glyphs


def test_render_is_deterministic_and_varied():
    fonts = find_fonts("AB")
    a = render_glyph("A", fonts, 24, np.random.default_rng([0, 0, 1]))
    b = render_glyph("A", fonts, 24, np.random.default_rng([0, 0, 1]))
    c = render_glyph("A", fonts, 24, np.random.default_rng([0, 0, 2]))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 3  # not a blank image


def test_synth_glyphs_folder_is_deterministic_and_loads(tmp_path):
    r1 = synth_glyphs("ABC", tmp_path / "g1", n_per_class=5, size=16, seed=3)
    synth_glyphs("ABC", tmp_path / "g2", n_per_class=5, size=16, seed=3)
    assert [c["name"] for c in r1["classes"]] == ["00_a", "01_b", "02_c"]
    files1 = sorted(p.relative_to(tmp_path / "g1") for p in (tmp_path / "g1").rglob("*.png"))
    assert len(files1) == 15 and len(list((tmp_path / "g1" / "test").rglob("*.png"))) == 3
    for rel in files1:
        assert (tmp_path / "g1" / rel).read_bytes() == (tmp_path / "g2" / rel).read_bytes(), rel
    info = json.loads((tmp_path / "g1" / "glyphs.json").read_text())
    assert info["characters"] == "ABC" and info["seed"] == 3
    splits = load_data(str(tmp_path / "g1"), progress=False)
    assert splits.classes == ["00_a", "01_b", "02_c"]
    assert splits.channels == 3 and splits.image_size == (16, 16)
    assert len(splits.train.labels) == 12 and len(splits.test.labels) == 3
    with pytest.raises(ValueError, match="already holds"):
        synth_glyphs("ABC", tmp_path / "g1", n_per_class=5, size=16, seed=3)


def test_falls_back_to_pillow_default_font(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "installed_fonts", lambda: [])
    assert find_fonts("XYZ") == ["<pillow-default>"]
    r = synth_glyphs("XY", tmp_path / "g", n_per_class=2, size=16, seed=0)
    assert r["fonts"] == ["<pillow-default>"]
    # A script Pillow's font cannot draw, with no font installed: a clear message naming the fix.
    with pytest.raises(ValueError, match="fonts-noto"):
        find_fonts(resolve_alphabet("phoenician")[0])


def test_alphabets_and_errors(tmp_path):
    assert len(resolve_alphabet("hebrew")[0]) == 22
    assert len(resolve_alphabet("aramaic")[0]) == 22
    assert resolve_alphabet("ABA B")[0] == "AB"
    with pytest.raises(ValueError, match="--alphabet"):
        resolve_alphabet("A")
    with pytest.raises(FileNotFoundError, match="--font"):
        find_fonts("AB", font=tmp_path / "missing.ttf")


def test_cli_synth(tmp_path, capsys):
    from reslab.cli import main

    assert main(["synth", "glyphs", "--alphabet", "AB", "--n-per-class", "3", "--size", "12",
                 "--out", str(tmp_path / "g")]) == 0
    assert "2 classes x 3 images" in capsys.readouterr().out
