"""Videos as lazy frame sources: a list of frames, a folder of frame images, or a video file decoded with PyAV.

Nothing here holds all decoded frames of a video: a frame source decodes the frame it is asked for, and
[`Sam2FrameSource`] turns it into SAM2's input on demand, so that a model can stream a long video frame by frame.

Cost of random access:

- a list of frames or a folder: `O(1)` a frame (one image file read for paths);
- a video file ([`PyAVFrameSource`]): reading frames in order costs one decode per frame. Jumping to another
  frame seeks to the closest key frame at or before it and decodes forward from there, so a jump costs at most
  one group of pictures (GOP) of decoding. When the container has no timestamps the source can only decode
  forward, and a jump backwards restarts decoding from the first frame (`O(index)`).

This file is copied flat into Hub repositories beside the processor (remote code): it imports only numpy, PIL,
torch, transformers and (when installed) PyAV.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.utils import is_av_available

from .image_io import (
    IMAGE_FILE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_sam_resample,
    describe_input,
    image_size_hw,
    load_image,
    sam2_preprocess,
)

if is_av_available():
    import av

#: File name extensions read as video files with PyAV (lower case).
VIDEO_FILE_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif", ".ogv", ".wmv")

KEY_FRAME_SAMPLINGS = ("first", "uniform")

# a forward jump longer than this many frames seeks (to the closest key frame) instead of decoding every frame
_FORWARD_SEEK_DISTANCE = 48


# -- key frames ----------------------------------------------------------------------------------------------------


def sample_key_frames(num_frames: int, num_key_frames: int, sampling: str = "first") -> list[int]:
    """Indices of the key frames the VLM sees.

    Args:
        num_frames: frames in the clip (≥ 1).
        num_key_frames: how many key frames (≥ 1); all frames when the clip is shorter.
        sampling: `"first"`: the first `num_key_frames` frames (Sa2VA's choice); `"uniform"`: evenly spaced over
            the whole clip, first and last frame included (`round(linspace(0, num_frames - 1, num_key_frames))`,
            halves rounded up).

    Returns:
        Sorted, distinct frame indices.
    """
    if sampling not in KEY_FRAME_SAMPLINGS:
        raise ValueError(f"key_frame_sampling={sampling!r} is not valid; use one of {list(KEY_FRAME_SAMPLINGS)}")
    if isinstance(num_key_frames, bool) or not isinstance(num_key_frames, int) or num_key_frames < 1:
        raise ValueError(f"num_key_frames must be an integer >= 1, got {num_key_frames!r}")
    if num_frames < 1:
        raise ValueError(f"the video has {num_frames} frames; key frames need at least one frame")
    if num_key_frames >= num_frames:
        return list(range(num_frames))
    if sampling == "first":
        return list(range(num_key_frames))
    positions = np.linspace(0.0, num_frames - 1, num_key_frames)
    return [int(np.floor(position + 0.5)) for position in positions]


# -- frame sources -------------------------------------------------------------------------------------------------


class FrameSource(Sequence):
    """A video as a sequence of RGB PIL frames decoded on demand.

    Subclasses implement `__len__`, `_load(index)` and set `name` (used in error messages). All frames of a video
    must have the same size; `original_size` is `(height, width)`.
    """

    name: str = "video"

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        length = len(self)
        if isinstance(index, (np.integer, torch.Tensor)):
            index = int(index)
        if not isinstance(index, int):
            raise TypeError(f"{self.name}: frame indices must be integers, got {type(index).__name__}")
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"{self.name}: frame {index} is out of range for a video of {length} frames")
        return index

    def __getitem__(self, index: int) -> Image.Image:
        frame = self._load(self._check_index(index))
        if image_size_hw(frame) != self.original_size:
            raise ValueError(
                f"{self.name}: frame {index} has size {image_size_hw(frame)} (height, width) but the video's first "
                f"frame has size {self.original_size}; all frames of a video must have the same size"
            )
        return frame

    def __iter__(self) -> Iterator[Image.Image]:
        for index in range(len(self)):
            yield self[index]

    @property
    def original_size(self) -> tuple[int, int]:
        """`(height, width)` of the frames."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (a no-op for in-memory frames)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_frames={len(self)}, original_size={self.original_size})"


class ImageListFrameSource(FrameSource):
    """Frames given as a list of PIL images, numpy arrays `(H, W, 3)` or image paths (read when asked for).

    A numpy array of shape `(T, H, W, 3)` (or a tensor) is taken as `T` frames.
    """

    def __init__(self, frames, name: str = "video"):
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4:
                raise ValueError(
                    f"{name}: a video array must have shape (num_frames, height, width, channels), got "
                    f"{tuple(frames.shape)}"
                )
            frames = list(frames)
        self.frames = list(frames)
        self.name = name
        if len(self.frames) == 0:
            raise ValueError(f"{name}: the video has zero frames; pass at least one frame")
        self._first = self._load(0)
        self._size = image_size_hw(self._first)

    def __len__(self) -> int:
        return len(self.frames)

    def _load(self, index: int) -> Image.Image:
        if index == 0 and getattr(self, "_first", None) is not None:
            return self._first
        frame = self.frames[index]
        return load_image(frame, name=f"{self.name}, frame {index} ({describe_input(frame)})")

    @property
    def original_size(self) -> tuple[int, int]:
        return self._size


def _natural_key(path: Path) -> list:
    """Sort key so that `frame2.png` comes before `frame10.png`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class FolderFrameSource(ImageListFrameSource):
    """The image files of a folder (extensions in `IMAGE_FILE_EXTENSIONS`), in natural order of their names."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"frame folder {str(folder)!r} does not exist")
        paths = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_FILE_EXTENSIONS), key=_natural_key
        )
        if not paths:
            raise ValueError(
                f"frame folder {str(folder)!r} has zero frames: it contains no image file with one of the extensions "
                f"{list(IMAGE_FILE_EXTENSIONS)}"
            )
        super().__init__(paths, name=f"frame folder {str(folder)!r}")
        self.folder = folder


class PyAVFrameSource(FrameSource):
    """Frames of a video file, decoded with PyAV (no ffmpeg binary, no torchvision).

    Opening the source reads the container's packets once without decoding them (to count the frames and record
    their timestamps) and decodes the first frame (to check that the codec is supported). Frames read in order
    cost one decode each; see the module docstring for the cost of jumps. Only the first frame (for its size) and
    the decoder's state are kept between calls.
    """

    _container = None
    _decoder = None

    def __init__(self, path: str | os.PathLike):
        if not is_av_available():
            raise ImportError(f"decoding the video file {str(path)!r} needs PyAV: pip install av")
        self.path = Path(path)
        self.name = f"video file {str(self.path)!r}"
        if not self.path.is_file():
            raise FileNotFoundError(f"video file {str(self.path)!r} does not exist")
        self._container = None
        self._decoder = None
        self._next_index = 0
        self._frame_pts: list[int] | None = None
        self._num_frames = self._index_frames()
        self._first = self._decode_at(0)
        self._size = image_size_hw(self._first)

    # -- opening and indexing ----------------------------------------------------------------------------------

    def _open(self):
        try:
            container = av.open(str(self.path))
        except av.error.FFmpegError as error:
            raise ValueError(f"cannot read {self.name}: the file is corrupt or not a video ({error})") from error
        if len(container.streams.video) == 0:
            container.close()
            raise ValueError(f"{self.name} has no video stream (zero frames); pass a file with a video track")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            container.close()
            raise ValueError(
                f"{self.name} uses a video codec that this PyAV/FFmpeg build cannot decode (unsupported codec); "
                "re-encode it, e.g. to H.264 or MPEG-4, or pass a folder of frames"
            )
        stream.thread_type = "AUTO"
        return container, stream

    def _index_frames(self) -> int:
        container, stream = self._open()
        try:
            pts = [packet.pts for packet in container.demux(stream) if packet.size > 0]
        except av.error.FFmpegError as error:
            raise ValueError(f"cannot read {self.name}: the file is corrupt ({error})") from error
        finally:
            container.close()
        if not pts:
            raise ValueError(f"{self.name} has zero frames; pass a video with at least one frame")
        if all(value is not None for value in pts) and len(set(pts)) == len(pts):
            self._frame_pts = sorted(pts)
        return len(pts)

    # -- decoding ----------------------------------------------------------------------------------------------

    def _restart(self, seek_pts: int | None = None) -> None:
        self.close()
        self._container, stream = self._open()
        if seek_pts is not None:
            self._container.seek(int(seek_pts), stream=stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(stream)

    def _next_frame(self, index_hint: int):
        try:
            return next(self._decoder)
        except StopIteration:
            raise ValueError(
                f"{self.name}: frame {index_hint} could not be decoded (the stream ended after fewer frames than its "
                f"{self._num_frames} packets); the file may be truncated"
            ) from None
        except av.error.FFmpegError as error:
            raise ValueError(
                f"{self.name}: decoding frame {index_hint} failed ({error}); the file is corrupt"
            ) from error

    def _decode_at(self, index: int) -> Image.Image:
        jump = self._decoder is None or index < self._next_index or index - self._next_index > _FORWARD_SEEK_DISTANCE
        if jump:
            if self._frame_pts is not None:
                self._restart(self._frame_pts[index])
                target = self._frame_pts[index]
                while True:
                    frame = self._next_frame(index)
                    if frame.pts is None or frame.pts > target:
                        break  # no timestamps, or not the packets' ones: fall back to decoding from the start
                    if frame.pts == target:
                        self._next_index = index + 1
                        return frame.to_image()
                self._frame_pts = None
                self._decoder = None
            if self._decoder is None or index < self._next_index:
                self._restart()
                self._next_index = 0
        frame = None
        while self._next_index <= index:
            frame = self._next_frame(self._next_index)
            self._next_index += 1
        return frame.to_image()

    def _load(self, index: int) -> Image.Image:
        if index == 0:
            return self._first
        return self._decode_at(index)

    def __len__(self) -> int:
        return self._num_frames

    @property
    def original_size(self) -> tuple[int, int]:
        return self._size

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = None
        self._decoder = None
        self._next_index = 0

    def __del__(self):
        self.close()


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether a path names a video file, by its extension."""
    return Path(path).suffix.lower() in VIDEO_FILE_EXTENSIONS


def open_video(video, name: str = "video") -> FrameSource:
    """Open a video as a lazy [`FrameSource`].

    Args:
        video: a path to a video file (decoded with PyAV), a path to a folder of frame images, a list of frames
            (PIL images, arrays `(H, W, 3)` or image paths), an array `(T, H, W, 3)`, or a `FrameSource`.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: zero frames, an unreadable file or an unsupported codec.
    """
    if isinstance(video, FrameSource):
        return video
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            return FolderFrameSource(path)
        if not path.exists():
            raise FileNotFoundError(f"video {str(path)!r} does not exist (pass a video file or a folder of frames)")
        if path.suffix.lower() in IMAGE_FILE_EXTENSIONS:
            return ImageListFrameSource([path], name=f"video {str(path)!r}")
        return PyAVFrameSource(path)
    if isinstance(video, (list, tuple, np.ndarray, torch.Tensor)):
        return ImageListFrameSource(video, name=name)
    raise TypeError(
        f"{name}: unsupported video input of type {type(video).__name__}; pass a video file path, a folder of frames "
        "or a list of frames"
    )


# -- SAM2 frames ---------------------------------------------------------------------------------------------------


class FramePrefetcher:
    """Computes items of a sequence on one background thread, `depth` items ahead of the last one asked for.

    `get(i)` returns `load(i)`. After each call the next `depth` indices in the direction of reading (forward, or
    backward after an index lower than the previous one) are queued; queued items that left that window are
    dropped. All `load` calls run on the same single worker thread, one at a time and in the order they were
    queued, so a decoder that is not thread-safe (PyAV) is only ever used from that thread. An error raised by
    `load` is raised by the `get` of that index.

    Args:
        load (`Callable[[int], Any]`): computes item `i` (e.g. decode and preprocess frame `i`).
        length (`int`): number of items (indices `0 … length − 1`).
        depth (`int`): items computed ahead (≥ 1).
    """

    def __init__(self, load: Callable[[int], object], length: int, depth: int):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth={depth!r} must be an integer >= 1 (use prefetch=0 to turn it off)")
        self.load = load
        self.length = int(length)
        self.depth = depth
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._last: int | None = None
        self._lock = threading.Lock()

    def _submit(self, index: int) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskcma-frame-prefetch")
        return self._executor.submit(self.load, index)

    def window(self, index: int) -> list[int]:
        """The indices queued after reading `index` (nearest first), given the previous index read."""
        step = -1 if self._last is not None and index < self._last else 1
        ahead = (index + step * offset for offset in range(1, self.depth + 1))
        return [i for i in ahead if 0 <= i < self.length]

    def get(self, index: int):
        """Item `index`, from the queue when it was prefetched (waits for it) or computed now on the worker."""
        with self._lock:
            wanted = self.window(index)
            for stale in [i for i in self._pending if i != index and i not in wanted]:
                self._pending.pop(stale).cancel()  # a running one finishes; its result is dropped
            future = self._pending.pop(index, None) or self._submit(index)
            for ahead in wanted:
                if ahead not in self._pending:
                    self._pending[ahead] = self._submit(ahead)
            self._last = index
        return future.result()

    @property
    def queued(self) -> list[int]:
        """Indices queued or computed ahead and not yet read (sorted)."""
        with self._lock:
            return sorted(self._pending)

    def close(self) -> None:
        """Drop the queue and stop the worker thread (waits for a running `load`)."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            executor, self._executor = self._executor, None
            self._last = None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


class Sam2FrameSource(Sequence):
    """SAM2-ready frames of a video, computed on demand: `source[i]` is the `(3, S, S)` float tensor of frame `i`
    (plain resize to `S`², ImageNet mean/std), so a model can stream the video without holding every frame.

    Args:
        frames ([`FrameSource`]): the decoded frames.
        image_size (`int`): SAM2's input size `S`.
        image_mean, image_std: normalisation (ImageNet by default).
        resample (`str`): the resize filter, `"bilinear"` (default) or `"bicubic"` (see `image_io.sam2_preprocess`).
        round_to (`torch.dtype`, *optional*): round each normalised frame to this dtype before `dtype` (Sa2VA's video
            frames: `torch.bfloat16`).
        device, dtype: where and in which dtype the tensors are returned (`to()` gives a copy with other values).
        prefetch (`int`, defaults to 2): frames decoded and preprocessed ahead on a background thread while the
            model works on the current one ([`FramePrefetcher`]; forward or backward, following the reads); 0 reads
            each frame when asked. Copies made by `to()` share the prefetcher, so the frames are read by one thread
            only; while a source prefetches, read its frames through it (not from `frames` directly).

    Attributes:
        original_size (`tuple[int, int]`): `(height, width)` of the frames.
    """

    def __init__(
        self,
        frames: FrameSource,
        image_size: int,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        resample: str = "bilinear",
        round_to: torch.dtype | None = None,
        prefetch: int = 2,
    ):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"Sam2FrameSource: prefetch={prefetch!r} must be an integer >= 0 (0 turns it off)")
        self.frames = frames
        self.resample = check_sam_resample(resample)
        self.round_to = round_to
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.prefetch = prefetch
        self.prefetcher = FramePrefetcher(self._preprocess, len(frames), prefetch) if prefetch else None

    def __len__(self) -> int:
        return len(self.frames)

    def _preprocess(self, index: int) -> torch.Tensor:
        """Frame `index` decoded and preprocessed: `(3, S, S)` float32 on the CPU."""
        return sam2_preprocess(
            self.frames[index],
            self.image_size,
            self.image_mean,
            self.image_std,
            resample=self.resample,
            round_to=self.round_to,
        )

    def __getitem__(self, index: int) -> torch.Tensor:
        """Frame `index` as a `(3, S, S)` tensor on `device` in `dtype`."""
        if self.prefetcher is None:
            pixels = self._preprocess(index)
        else:
            check = getattr(self.frames, "_check_index", None)
            pixels = self.prefetcher.get(check(index) if check is not None else int(index))
        return pixels.to(device=self.device, dtype=self.dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["prefetcher"] = None  # a thread does not pickle; the copy reads frames when asked
        state["prefetch"] = 0
        return state

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    @property
    def original_size(self) -> tuple[int, int]:
        return self.frames.original_size

    @property
    def num_frames(self) -> int:
        return len(self)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Sam2FrameSource:
        """A source over the same frames returning tensors on `device` / in `dtype`."""
        copy = Sam2FrameSource(
            self.frames,
            self.image_size,
            self.image_mean,
            self.image_std,
            device=self.device if device is None else device,
            dtype=self.dtype if dtype is None else dtype,
            resample=self.resample,
            round_to=self.round_to,
            prefetch=0,
        )
        copy.prefetch, copy.prefetcher = self.prefetch, self.prefetcher  # one reader thread for both
        return copy

    def stack(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Frames `indices` (default: all) as one tensor `(len(indices), 3, S, S)`; holds them all in memory."""
        indices = range(len(self)) if indices is None else indices
        return torch.stack([self[int(i)] for i in indices])

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.frames.close()

    def __repr__(self) -> str:
        return (
            f"Sam2FrameSource(frames={self.frames!r}, image_size={self.image_size}, device={self.device}, "
            f"dtype={self.dtype})"
        )


__all__ = [
    "FolderFrameSource",
    "FramePrefetcher",
    "FrameSource",
    "ImageListFrameSource",
    "KEY_FRAME_SAMPLINGS",
    "PyAVFrameSource",
    "Sam2FrameSource",
    "VIDEO_FILE_EXTENSIONS",
    "is_video_file",
    "open_video",
    "sample_key_frames",
]
