"""Every image kind turns into the right 8-bit RGB pixels, and bad inputs name themselves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rewardlab.io.images import ImageLoadError, expand_paths, open_image
from rewardlab.registry import Preprocess
from rewardlab.scoring.preprocess import pil_to_array

SPEC = Preprocess(size=8)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    array = np.full((8, 8), 32768, dtype=np.uint16)
    array[0, 0] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    out = pil_to_array(open_image(path), SPEC)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[4, 4].tolist() == [128, 128, 128]  # 32768/65535*255 = 127.5 -> 128


def test_palette_converted_to_colours_before_resizing(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 30, 60))
    rgb.paste((10, 220, 40), (0, 0, 8, 16))
    path = tmp_path / "pal.gif"
    rgb.convert("P", palette=Image.ADAPTIVE, colors=4).save(path)
    image = open_image(path)
    assert image.mode == "RGB"
    out = pil_to_array(image, SPEC)
    assert out[0, 0].tolist() == [10, 220, 40] and out[0, 7].tolist() == [200, 30, 60]


def test_cmyk_and_grayscale(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert pil_to_array(open_image(tmp_path / "c.jpg"), SPEC)[3, 3].tolist() == pytest.approx([255, 0, 0], abs=3)
    Image.new("L", (8, 8), 77).save(tmp_path / "g.png")
    assert pil_to_array(open_image(tmp_path / "g.png"), SPEC)[0, 0].tolist() == [77, 77, 77]


def test_rgba_alpha_dropped_like_reference():
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert pil_to_array(open_image(image), SPEC)[0, 0].tolist() == [10, 20, 30]


def test_numpy_inputs():
    hwc = np.zeros((8, 8, 3), dtype=np.uint8)
    hwc[..., 0] = 200
    assert pil_to_array(open_image(hwc), SPEC)[0, 0].tolist() == [200, 0, 0]
    chw = np.moveaxis(hwc, -1, 0)
    assert pil_to_array(open_image(chw), SPEC)[0, 0].tolist() == [200, 0, 0]
    floats = np.full((8, 8, 3), 0.5, dtype=np.float32)
    assert pil_to_array(open_image(floats), SPEC)[0, 0].tolist() == [128, 128, 128]
    deep = np.full((8, 8, 3), 65535, dtype=np.uint16)
    assert pil_to_array(open_image(deep), SPEC)[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ImageLoadError, match="image #3.*shape"):
        open_image(np.zeros((2, 8, 8, 3)), index=3)
    with pytest.raises(ImageLoadError, match="NaN"):
        open_image(np.full((8, 8), np.nan))


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        open_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageLoadError, match="broken.png: cannot decode"):
        open_image(tmp_path / "broken.png")
    with pytest.raises(ImageLoadError, match="not a file"):
        open_image(tmp_path)
    with pytest.raises(ImageLoadError, match="unsupported input type int"):
        open_image(42)


def test_expand_paths_sorts_folder_contents(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.webp").write_bytes(b"")
    assert [p.split("/")[-1] for p in expand_paths([str(tmp_path), "x.png"])] == ["a.jpg", "b.png", "c.webp", "x.png"]
