"""Images read as a viewer shows them: 16-bit, palette, CMYK, LA, EXIF orientation; the max_image_pixels limit."""

import warnings

import numpy as np
import pytest
from PIL import Image

from transformers_maskcma.processing import image_io
from transformers_maskcma.processing.image_io import load_image


def rgb(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 2570, 50000, 65278]], dtype=np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    loaded = rgb(load_image(path))
    # 8-bit value = round(v / 257): 0, 1, 128, 255 / 4, 10, 195, 254 on all three channels
    expected = np.array([[0, 1, 128, 255], [4, 10, 195, 254]])
    for channel in range(3):
        assert np.array_equal(loaded[..., channel], expected)


def test_palette_image_gives_its_palette_colours(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.putdata([2, 0, 1])
    image.save(tmp_path / "palette.png")
    assert rgb(load_image(tmp_path / "palette.png")).tolist() == [[[10, 20, 30], [255, 0, 0], [0, 128, 0]]]


def test_palette_transparency_is_composited_over_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 200, 0, 0] + [0] * (254 * 3))
    image.putdata([0, 1])
    image.save(tmp_path / "transparent.png", transparency=0)
    assert rgb(load_image(tmp_path / "transparent.png")).tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_cmyk_image_gives_the_rgb_a_viewer_shows(tmp_path):
    image = Image.new("CMYK", (4, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0), (0, 255, 255, 0)]):
        image.putpixel((x, 0), value)
    image.save(tmp_path / "cmyk.tif")
    # cyan, black, white (paper), red
    expected = [[[0, 255, 255], [0, 0, 0], [255, 255, 255], [255, 0, 0]]]
    assert rgb(load_image(tmp_path / "cmyk.tif")).tolist() == expected


def test_gray_with_alpha_is_composited_over_white(tmp_path):
    pixels = np.array([[[100, 255], [200, 0], [0, 128]]], dtype=np.uint8)  # opaque, transparent, half
    Image.fromarray(pixels, mode="LA").save(tmp_path / "la.png")
    loaded = rgb(load_image(tmp_path / "la.png"))
    # alpha compositing: out = a*v + (1 - a)*255 → 100, 255, about 127
    assert loaded[0, 0].tolist() == [100, 100, 100]
    assert loaded[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in loaded[0, 2])


def test_rgba_array_is_composited_over_white():
    array = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], dtype=np.uint8)
    assert rgb(load_image(array)).tolist() == [[[10, 20, 30], [255, 255, 255]]]


@pytest.mark.parametrize(
    "orientation, expected",
    [
        (1, [[1, 2, 3], [4, 5, 6]]),  # as stored
        (3, [[6, 5, 4], [3, 2, 1]]),  # rotated 180°
        (6, [[4, 1], [5, 2], [6, 3]]),  # stored rotated 90° counter-clockwise: shown turned clockwise
        (8, [[3, 6], [2, 5], [1, 4]]),  # stored rotated 90° clockwise: shown turned counter-clockwise
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, expected):
    stored = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8) * 40
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.png"
    image.save(path, exif=exif)
    loaded = rgb(load_image(path))[..., 0]
    assert (loaded // 40).tolist() == expected
    # a PIL image opened by the caller is turned the same way
    assert (rgb(load_image(Image.open(path)))[..., 0] // 40).tolist() == expected


def test_too_large_image_is_refused_before_decoding_without_pil_warning(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would warn (and raise at 2x) for this image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"30x20 = 600 pixels, above max_image_pixels=500.*MASKCMA_MAX_IMAGE"):
            load_image(tmp_path / "big.png", max_image_pixels=500)
        # under our limit: loaded, and PIL's own check neither warns nor raises
        assert load_image(tmp_path / "big.png", max_image_pixels=600).size == (30, 20)
        assert load_image(tmp_path / "big.png", max_image_pixels=None).size == (30, 20)
    assert Image.MAX_IMAGE_PIXELS == 100  # PIL's setting is restored


def test_module_limit_applies_to_every_input_kind(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(ValueError, match="above max_image_pixels=50"):
        load_image(np.zeros((10, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="above max_image_pixels=50"):
        load_image(Image.new("RGB", (8, 8)))
    assert load_image(Image.new("RGB", (7, 7))).size == (7, 7)


def test_default_limit_refuses_a_ten_thousand_pixel_square(monkeypatch):
    assert image_io.DEFAULT_MAX_IMAGE_PIXELS < 10_000 * 10_000
    monkeypatch.setenv("MASKCMA_MAX_IMAGE_PIXELS", "none")
    assert image_io._limit_from_environment(image_io.DEFAULT_MAX_IMAGE_PIXELS) is None
    monkeypatch.setenv("MASKCMA_MAX_IMAGE_PIXELS", "2e8")
    assert image_io._limit_from_environment(image_io.DEFAULT_MAX_IMAGE_PIXELS) == 200_000_000
    monkeypatch.setenv("MASKCMA_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="MASKCMA_MAX_IMAGE_PIXELS='lots'"):
        image_io._limit_from_environment(image_io.DEFAULT_MAX_IMAGE_PIXELS)


def test_truncated_image_file_names_the_file(tmp_path):
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
