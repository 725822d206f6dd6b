"""Loading images (PIL images, numpy arrays, file paths) and the SAM2 resize.

This file is copied flat into Hub repositories beside the processor (remote code): it imports only numpy, PIL,
torch and the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: ImageNet mean and standard deviation (RGB, for pixel values in [0, 1]): SAM2's and InternVL's normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Resampling filters of the SAM2 resize (`MaskCMAProcessor(sam_resample=...)`): our models use `"bilinear"`; Sa2VA
#: resizes with PIL's default filter for RGB images, `"bicubic"`.
SAM2_RESAMPLES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

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
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def load_image(image, name: str | None = None) -> Image.Image:
    """Load one image as an RGB PIL image.

    Args:
        image: a `PIL.Image.Image`, a numpy array `(H, W[, C])` (see `array_to_image`), a `torch.Tensor`
            `(H, W, C)` uint8, or a path to an image file.
        name: how the input is named in error messages (default: the path, or the type and shape).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, or the array has the wrong shape or values.
    """
    name = name or describe_input(image)
    if isinstance(image, Image.Image):
        if image.size[0] == 0 or image.size[1] == 0:
            raise ValueError(f"{name}: the image is empty")
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return array_to_image(image, name)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, not an image file (pass folders of frames as videos=...)")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"cannot read image file {str(path)!r}: the file is corrupt or not an image ({error})"
            ) from error
    raise TypeError(
        f"{name}: unsupported image input; pass a PIL image, a numpy array (H, W, 3) or the path to an image file"
    )


def sam2_preprocess(
    image: Image.Image,
    image_size: int,
    image_mean: tuple[float, float, float] = IMAGENET_MEAN,
    image_std: tuple[float, float, float] = IMAGENET_STD,
    resample: str = "bilinear",
    dtype: torch.dtype = torch.float32,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """SAM2's input: a plain (aspect-ratio changing) PIL resize of the 8-bit RGB image to `image_size`², scaled to
    [0, 1] and normalised with `image_mean`/`image_std`.

    Args:
        image: an RGB PIL image of any size.
        resample: `"bilinear"` or `"bicubic"` (see `SAM2_RESAMPLES`).
        dtype: the dtype of the arithmetic: the pixels, the division by 255, `image_mean` and `image_std` are all in
            this dtype (`torch.bfloat16`: how Sa2VA prepares an image).
        round_to (*optional*): round the result to this dtype (`torch.bfloat16`: how Sa2VA prepares video frames,
            computed in float32).

    Returns:
        `torch.FloatTensor` of shape `(3, image_size, image_size)`.
    """
    filter_ = SAM2_RESAMPLES[check_sam_resample(resample)]
    resized = image.convert("RGB").resize((image_size, image_size), resample=filter_)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).to(dtype) / 255.0
    mean = torch.tensor(image_mean, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=dtype).view(3, 1, 1)
    normalized = (pixels - mean) / std
    if round_to is not None:
        normalized = normalized.to(round_to)
    return normalized.float()


#: How the SAM2 input is normalised (`MaskCMAProcessor(sam_normalization=...)`), as `sam2_preprocess` arguments for
#: `(images, video frames)`. `"float32"`: float32 arithmetic (our models). `"sa2va_bfloat16"`: as Sa2VA's
#: `predict_forward` runs, whatever the model's dtype: an image is normalised in bfloat16 arithmetic (its mean and
#: std rounded to bfloat16), a video frame in float32 and the result rounded to bfloat16.
SAM2_NORMALIZATIONS = {
    "float32": ({}, {}),
    "sa2va_bfloat16": ({"dtype": torch.bfloat16}, {"round_to": torch.bfloat16}),
}


def check_sam_normalization(normalization: str) -> str:
    """`normalization` if it is one of `SAM2_NORMALIZATIONS`, else a `ValueError` that lists them."""
    if normalization not in SAM2_NORMALIZATIONS:
        raise ValueError(
            f"sam_normalization={normalization!r} is not valid; use one of {list(SAM2_NORMALIZATIONS)}"
        )
    return normalization


def check_sam_resample(resample: str) -> str:
    """`resample` if it is one of `SAM2_RESAMPLES`, else a `ValueError` that lists them."""
    if resample not in SAM2_RESAMPLES:
        raise ValueError(f"sam_resample={resample!r} is not valid; use one of {list(SAM2_RESAMPLES)}")
    return resample


def image_size_hw(image: Image.Image) -> tuple[int, int]:
    """`(height, width)` of a PIL image."""
    return int(image.size[1]), int(image.size[0])


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_FILE_EXTENSIONS",
    "SAM2_NORMALIZATIONS",
    "SAM2_RESAMPLES",
    "array_to_image",
    "check_sam_normalization",
    "check_sam_resample",
    "describe_input",
    "image_size_hw",
    "load_image",
    "sam2_preprocess",
]
