"""Loading images (PIL images, numpy arrays, file paths) and the SAM2 resize.

Every image becomes the RGB picture an image viewer shows:

- the EXIF orientation is applied (a phone photo stored sideways is turned upright);
- 16-bit images (PIL modes ``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding 16-bit values) are scaled to 8 bits
  (``round(v / 257)``) instead of being clipped to white;
- palette (``P``), CMYK, grayscale (``L``, ``1``) images are converted to RGB (CMYK with the usual
  ``255 · (1 − C)(1 − K)`` rule; embedded colour profiles are not applied);
- transparency (``RGBA``, ``LA``, ``PA``, palette transparency, 4-channel arrays) is composited over a white
  background, as transformers' ``convert_to_rgb`` does.

Images larger than `MAX_IMAGE_PIXELS` (width × height, default 40 million: about 6300 × 6300) are refused with a
`ValueError` naming the size and the limit before their pixels are decoded: a 10000 × 10000 image would need several
GB of memory. Raise the limit with ``load_image(..., max_image_pixels=N)``, the ``MASKCMA_MAX_IMAGE_PIXELS``
environment variable, or by setting ``image_io.MAX_IMAGE_PIXELS`` (``None``: no limit). This check replaces PIL's
`DecompressionBombWarning`.

This file is copied flat into Hub repositories beside the processor (remote code): it imports only numpy, PIL,
torch and the standard library.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def _limit_from_environment(default: int) -> int | None:
    value = os.environ.get("MASKCMA_MAX_IMAGE_PIXELS")
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() in ("none", "0"):
        return None
    try:
        limit = int(float(value))
    except ValueError:
        raise ValueError(
            f"MASKCMA_MAX_IMAGE_PIXELS={value!r} is not a number of pixels; set an integer (e.g. 100000000) or "
            "'none' for no limit"
        ) from None
    return limit


#: Largest image (width × height) that is decoded; `None` = no limit (module docstring).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_PIXELS: int | None = _limit_from_environment(DEFAULT_MAX_IMAGE_PIXELS)

_PIL_LIMIT_LOCK = threading.Lock()
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

#: ImageNet mean and standard deviation (RGB, for pixel values in [0, 1]): SAM2's and InternVL's normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: File name extensions read as images (lower case).
IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def describe_input(value) -> str:
    """A short human-readable name of an input, for error messages (the path, or the type and shape)."""
    if isinstance(value, (str, os.PathLike)):
        return repr(str(value))
    if isinstance(value, Image.Image):
        return f"PIL image {value.size[0]}x{value.size[1]} (mode {value.mode})"
    if isinstance(value, np.ndarray):
        return f"numpy array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"object of type {type(value).__name__}"


def array_to_image(array: np.ndarray, name: str = "image") -> Image.Image:
    """Convert an image array to an RGB PIL image.

    Args:
        array (`np.ndarray` of shape `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`): `uint8` values in
            [0, 255], or floating-point values in [0, 1].
        name: how the input is named in error messages.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name}: expected an image array of shape (H, W), (H, W, 3) or (H, W, 4) (channels last), got shape "
            f"{tuple(array.shape)}; transpose channels-first arrays with array.transpose(1, 2, 0)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: the image array is empty (shape {tuple(array.shape)})")
    if array.ndim == 3 and array.shape[-1] == 4:
        return _composite_on_white(Image.fromarray(np.ascontiguousarray(_to_uint8(array, name)), mode="RGBA"))
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, name))).convert("RGB")


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"{name}: floating-point image arrays must hold finite values in [0, 1]; got values in "
                f"[{np.nanmin(array)}, {np.nanmax(array)}] (pass uint8 arrays for [0, 255] values)"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{name}: integer image arrays must hold values in [0, 255], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def _composite_on_white(image: Image.Image) -> Image.Image:
    """An ``RGBA`` image over a white background, as RGB."""
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def _check_pixels(size: tuple[int, int], name: str, max_image_pixels: int | None) -> None:
    width, height = size
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"{name}: the image is {width}x{height} = {width * height:,} pixels, above max_image_pixels="
            f"{max_image_pixels:,} (a guard against multi-GB memory use and decompression bombs); downscale the image, "
            "or raise the limit: the environment variable MASKCMA_MAX_IMAGE_PIXELS=N (also for the maskcma commands; "
            "'none' = no limit) or load_image(..., max_image_pixels=N)"
        )


def to_viewer_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """The RGB picture a viewer shows for a PIL image (module docstring): EXIF orientation applied, 16-bit scaled,
    palette / CMYK / grayscale converted, transparency composited over white."""
    if image.size[0] == 0 or image.size[1] == 0:
        raise ValueError(f"{name}: the image is empty")
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(
                f"{name}: a {mode} image must hold 16-bit values in [0, 65535], got [{values.min()}, {values.max()}]; "
                "convert it to 8 bits before passing it"
            )
        gray = np.round(values / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        return array_to_image(np.asarray(image, dtype=np.float32), name)
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        return _composite_on_white(image)
    return image.convert("RGB")


_DEFAULT = object()


def load_image(image, name: str | None = None, max_image_pixels: int | None = _DEFAULT) -> Image.Image:
    """Load one image as the RGB PIL image a viewer shows (module docstring).

    Args:
        image: a `PIL.Image.Image`, a numpy array `(H, W[, C])` (see `array_to_image`), a `torch.Tensor`
            `(H, W, C)` uint8, or a path to an image file.
        name: how the input is named in error messages (default: the path, or the type and shape).
        max_image_pixels: largest width × height accepted (default `MAX_IMAGE_PIXELS`; `None` = no limit).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, is larger than `max_image_pixels`, or the array has the
            wrong shape or values.
    """
    name = name or describe_input(image)
    limit = MAX_IMAGE_PIXELS if max_image_pixels is _DEFAULT else max_image_pixels
    if isinstance(image, Image.Image):
        _check_pixels(image.size, name, limit)
        return to_viewer_rgb(image, name)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            _check_pixels((int(image.shape[1]), int(image.shape[0])), name, limit)
        return array_to_image(image, name)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not an image file (pass folders of frames as videos=...)")
        try:
            opened = _open_without_pil_limit(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"cannot read image file {str(path)!r}: the file is corrupt or not an image ({error})"
            ) from error
        with opened:
            _check_pixels(opened.size, name, limit)  # from the header, before any pixel is decoded
            try:
                opened.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise ValueError(
                    f"cannot read image file {str(path)!r}: the file is corrupt or truncated ({error})"
                ) from error
            return to_viewer_rgb(opened, name)
    raise TypeError(
        f"{name}: unsupported image input; pass a PIL image, a numpy array (H, W, 3) or the path to an image file"
    )


def _open_without_pil_limit(path: Path) -> Image.Image:
    """`Image.open` with PIL's own size check (a warning, or an error at twice its limit) off: `load_image` checks
    `max_image_pixels` itself, with a message that names the file and the way out."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def sam2_preprocess(
    image: Image.Image,
    image_size: int,
    image_mean: tuple[float, float, float] = IMAGENET_MEAN,
    image_std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """SAM2's input: a plain (aspect-ratio changing) bilinear resize to `image_size`², scaled to [0, 1] and
    normalised with `image_mean`/`image_std`.

    Args:
        image: an RGB PIL image of any size.

    Returns:
        `torch.FloatTensor` of shape `(3, image_size, image_size)`.
    """
    resized = image.convert("RGB").resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def image_size_hw(image: Image.Image) -> tuple[int, int]:
    """`(height, width)` of a PIL image."""
    return int(image.size[1]), int(image.size[0])


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_FILE_EXTENSIONS",
    "array_to_image",
    "describe_input",
    "image_size_hw",
    "load_image",
    "sam2_preprocess",
    "to_viewer_rgb",
]
