"""Drawing predicted masks: coloured, half-transparent overlays with outlines, mask PNGs, and overlay videos in a
codec web browsers play.

This file imports only numpy, PIL and (for videos) PyAV: `maskcma export --space` copies it into the Space folder
beside the web app, where this package is not installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

#: Video encoders Chromium, Firefox and Safari play, in order of preference, with the container each needs. MPEG-4
#: part 2 (`mpeg4`, PyAV's always-present fallback) is missing on purpose: browsers do not play it.
BROWSER_VIDEO_CODECS: tuple[tuple[str, str], ...] = (
    ("libvpx-vp9", ".webm"),
    ("libx264", ".mp4"),
    ("libopenh264", ".mp4"),
)

# fast settings per encoder: the overlays are previews, written while the user waits
_ENCODER_OPTIONS = {
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0", "row-mt": "1"},
    "libx264": {"preset": "veryfast", "crf": "23"},
    "libopenh264": {},
}

#: Overlay colours (RGB), one per object, repeating.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56),
    (56, 140, 255),
    (60, 220, 90),
    (255, 200, 40),
    (200, 70, 255),
    (40, 220, 230),
    (255, 130, 30),
    (255, 90, 200),
)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (or on the image border): the mask's boundary, `(H, W)` bool."""
    mask = mask.astype(bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_masks(image: Image.Image, masks: list[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """Blend each mask's colour into the image (`alpha` over the mask) and draw its outline in full colour.

    Args:
        image: RGB image `(W, H)`.
        masks: `(H, W)` bool arrays, one per object (colour `PALETTE[k % len(PALETTE)]`).

    Returns:
        A new RGB image.
    """
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != canvas.shape[:2]:
            raise ValueError(f"mask {index} has shape {mask.shape} but the image is {canvas.shape[:2]} (height, width)")
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * colour
        canvas[mask_outline(mask)] = colour
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """A bool mask `(H, W)` as a black-and-white (`L` mode, 0/255) PNG-ready image."""
    return Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


def browser_video_codec() -> tuple[str, str]:
    """The first encoder of `BROWSER_VIDEO_CODECS` the installed PyAV has: `(codec name, file suffix)`.

    Raises:
        RuntimeError: PyAV is missing or has none of them (the message says which it has).
    """
    try:
        import av
    except ImportError as error:
        raise RuntimeError("writing overlay videos needs PyAV: pip install av") from error
    for codec, suffix in BROWSER_VIDEO_CODECS:
        if codec in av.codecs_available:
            return codec, suffix
    raise RuntimeError(
        f"the installed PyAV {av.__version__} has no encoder browsers play ({[c for c, _ in BROWSER_VIDEO_CODECS]}); "
        "install a PyAV wheel built with libvpx or an H.264 encoder (the PyPI wheels are: av 18.1 has libvpx-vp9 "
        "and libx264)"
    )


def write_video(
    frames: Iterable[Image.Image | np.ndarray], path: str | Path, fps: float, codec: str | None = None
) -> Path:
    """Encode RGB frames into a video a browser plays (VP9 in WebM, else H.264 in MP4).

    Args:
        frames: RGB PIL images or `(H, W, 3)` uint8 arrays, all the same size. Odd sizes are padded by one pixel
            (edge colour) to the even size YUV 4:2:0 needs.
        path: where to write; its suffix is replaced by the codec's container (`.webm` or `.mp4`).
        fps: frames per second (> 0).
        codec: an encoder name of `BROWSER_VIDEO_CODECS` (default: `browser_video_codec()`).

    Returns:
        The path written.

    Raises:
        ValueError: no frame, `fps` ≤ 0, an unknown codec or frames of different sizes.
    """
    import av

    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    suffixes = dict(BROWSER_VIDEO_CODECS)
    if codec is None:
        codec, suffix = browser_video_codec()
    elif codec not in suffixes:
        raise ValueError(f"codec {codec!r} is not one browsers play; use one of {list(suffixes)}")
    else:
        suffix = suffixes[codec]
    path = Path(path).with_suffix(suffix)
    container = av.open(str(path), mode="w")
    try:
        stream = None
        for index, image in enumerate(frames):
            array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
            height, width = array.shape[:2]
            array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = array.shape[1], array.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.options = dict(_ENCODER_OPTIONS.get(codec, {}))
            elif (array.shape[1], array.shape[0]) != (stream.width, stream.height):
                raise ValueError(
                    f"frame {index} is {width}x{height} but the first frame is {stream.width}x{stream.height}; every "
                    "frame of a video must have the same size"
                )
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frame to write: the video would be empty")
        for packet in stream.encode():
            container.mux(packet)
    except BaseException:
        container.close()
        path.unlink(missing_ok=True)  # no half-written video left behind
        raise
    container.close()
    return path


__all__ = [
    "BROWSER_VIDEO_CODECS",
    "PALETTE",
    "browser_video_codec",
    "mask_outline",
    "mask_to_image",
    "overlay_masks",
    "write_video",
]
