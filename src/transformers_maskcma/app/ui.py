"""The MaskCMA web demo: a Gradio Blocks app over a MaskCMA model folder or Hub repository.

One module for two homes. `maskcma app` imports it from the package; `maskcma export --space DIR` copies it, with
`processing/visualize.py`, into a Hugging Face Space whose environment has transformers, torch, gradio and PyAV but
not this package. It therefore imports only those libraries, numpy, PIL and `..processing.visualize` (itself numpy,
PIL and PyAV only; the Space keeps the same relative layout), and loads the model through remote code
(`AutoModel` / `AutoProcessor` with `trust_remote_code=True`), calling the model's public `segment`.

What the page does:

- **Segment**: an image or a video and a prompt in; the answer, the overlay (an image, or a VP9/WebM or H.264/MP4
  video, codecs Chromium plays), one PNG mask per object (per object a ZIP of per-frame PNGs for videos), the scores
  and the time taken out. Long videos report progress per frame and can be cancelled (Cancel button).
- **CMA comparison**: the same image segmented with the CMA as trained and with its residual scale γ forced to 0
  (which leaves SAM2's embedding unchanged), side by side, the pixels where the masks differ highlighted, and the
  prompt tokens the CMA's router kept for each object (read with a forward hook on `model.cma`).
- **Limits** (`AppLimits`: pixels per image or frame, frames per video, prompt length) are checked before any work
  and answered with one line in the page; every error is one line, never a traceback.
- **Offline**: analytics off, and a theme with system fonts only (Gradio's default theme loads web fonts).
- **One job at a time**: the queue runs a single job (a CPU runs one model call well, not two).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no usage reports leave the machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

from ..processing.visualize import PALETTE, mask_to_image, overlay_masks, write_video  # noqa: E402

__all__ = [
    "AppLimits",
    "CMAComparison",
    "Example",
    "InputRejected",
    "JobCancelled",
    "MaskCMADemo",
    "SegmentationResult",
    "build_blocks",
    "launch",
    "main",
    "offline_theme",
]

#: File name suffixes read as videos (everything else is read as an image).
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif", ".ogv", ".mpg", ".mpeg")
#: Colour of the pixels only the CMA-on mask covers, and only the CMA-off mask covers, in the difference view.
ONLY_WITH_CMA = (0, 200, 90)
ONLY_WITHOUT_CMA = (230, 0, 200)
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace")


@dataclass(frozen=True)
class AppLimits:
    """What one request may ask of the server; larger inputs are refused with a message before any work.

    Args:
        max_pixels (`int`): pixels of an image or of one video frame (width × height).
        max_frames (`int`): frames of a video (decoded frames are held in memory: about
            `max_frames × max_pixels × 3` bytes at the limits).
        max_prompt_chars (`int`): characters of the prompt.
        max_new_tokens (`int`): length limit of the answer.
    """

    max_pixels: int = 4096 * 4096
    max_frames: int = 300
    max_prompt_chars: int = 500
    max_new_tokens: int = 32

    def __post_init__(self):
        for name in ("max_pixels", "max_frames", "max_prompt_chars", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AppLimits.{name} must be an integer >= 1, got {value!r}")

    def describe(self) -> str:
        return (
            f"Limits: {self.max_pixels:,} pixels per image or frame, {self.max_frames} frames per video, "
            f"{self.max_prompt_chars} characters per prompt."
        )


@dataclass(frozen=True)
class Example:
    """An example input of the page: a file (image or video) and its prompt."""

    path: str
    prompt: str

    @property
    def is_video(self) -> bool:
        return is_video_path(self.path)


class InputRejected(ValueError):
    """The input cannot be processed; the message (one line) says why and what to do, and is shown in the page."""


class JobCancelled(RuntimeError):
    """The user pressed Cancel while the job ran."""


@dataclass
class SegmentationResult:
    """One run of the Segment tab.

    Args:
        kind (`str`): `"image"` or `"video"`.
        answer (`str`): the model's answer.
        masks (`np.ndarray`): bool, `(num_objects, H, W)` for an image, `(num_objects, num_frames, H, W)` for a video.
        scores (`list[float]`): SAM2's predicted IoU per object.
        seconds (`float`): wall-clock time of the whole request (reading, model, drawing, writing).
        overlay (`PIL.Image.Image` or `None`): the image overlay.
        overlay_video (`Path` or `None`): the video overlay (WebM or MP4).
        mask_files (`list[Path]`): one PNG per object (image) or one ZIP of per-frame PNGs per object (video).
        fps (`float` or `None`): frame rate of the overlay video.
    """

    kind: str
    answer: str
    masks: np.ndarray
    scores: list[float]
    seconds: float
    overlay: Image.Image | None = None
    overlay_video: Path | None = None
    mask_files: list[Path] = field(default_factory=list)
    fps: float | None = None

    @property
    def num_objects(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class RoutedToken:
    """A prompt token the CMA's router kept for an object, with its routing probability (softmax of the router's
    scores over the candidate tokens)."""

    token: str
    probability: float


@dataclass
class CMAComparison:
    """One run of the CMA-comparison tab.

    Args:
        answer (`str`): the answer (the same with and without the CMA: γ acts after the language model).
        masks_with_cma, masks_without_cma (`np.ndarray`): bool `(num_objects, H, W)`, γ as trained and γ = 0.
        scores_with_cma, scores_without_cma (`list[float]`).
        overlay_with_cma, overlay_without_cma, difference (`PIL.Image.Image`): the two overlays and the difference
            view (the image greyed, `ONLY_WITH_CMA` where only the CMA-on masks cover a pixel, `ONLY_WITHOUT_CMA`
            where only the CMA-off masks do).
        routed_tokens (`list[list[RoutedToken]]`): per object, the tokens the router kept, best first.
        gamma (`float`): the model's γ.
        seconds (`float`).
    """

    answer: str
    masks_with_cma: np.ndarray
    masks_without_cma: np.ndarray
    scores_with_cma: list[float]
    scores_without_cma: list[float]
    overlay_with_cma: Image.Image
    overlay_without_cma: Image.Image
    difference: Image.Image
    routed_tokens: list[list[RoutedToken]]
    gamma: float
    seconds: float

    @property
    def differing_pixels(self) -> int:
        """Pixels covered by a mask in one run and not in the other (objects merged)."""
        return int((self.masks_with_cma.any(0) != self.masks_without_cma.any(0)).sum())


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def palette_hex(index: int) -> str:
    red, green, blue = PALETTE[index % len(PALETTE)]
    return f"#{red:02x}{green:02x}{blue:02x}"


class _WatchedFrames:
    """The processor's lazy frame source, calling `on_read(index)` before each frame is read: the model reads
    frames one at a time while it segments a video, so this is where progress is reported and cancellation is
    checked (`segment` accepts any object with `__len__` and `__getitem__`)."""

    def __init__(self, frames: Any, on_read: Callable[[int], None]):
        self.frames = frames
        self.on_read = on_read

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int):
        self.on_read(int(index))
        return self.frames[index]


class MaskCMADemo:
    """The app's work, independent of the page: read and check inputs, run `model.segment`, draw the results.

    Args:
        model: a MaskCMA model in eval mode (the package's class, or the same class loaded as remote code).
        processor: its processor.
        limits (`AppLimits`).
        output_dir (`Path`, *optional*): where result files go (one sub-folder per request; default a temporary
            folder).
        model_name (`str`): shown in the page.
    """

    def __init__(self, model, processor, limits: AppLimits | None = None, output_dir=None, model_name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.limits = limits or AppLimits()
        self.output_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="maskcma-app-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model_name = model_name
        self._cancel = threading.Event()
        self._running_session: str | None = None
        self._job_counter = 0
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_id: str, limits: AppLimits | None = None, **kwargs) -> MaskCMADemo:
        """Load `model_id` (a folder or a Hub repository) with `AutoModel` / `AutoProcessor` and remote code."""
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(model_id, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
        return cls(model, processor, limits=limits, model_name=kwargs.pop("model_name", str(model_id)), **kwargs)

    # -- inputs --------------------------------------------------------------------------------------------------

    def check_prompt(self, prompt: str | None) -> str:
        prompt = (prompt or "").strip()
        if not prompt:
            raise InputRejected("Type a prompt first, e.g. 'Please segment the red circle.'")
        if len(prompt) > self.limits.max_prompt_chars:
            raise InputRejected(
                f"The prompt has {len(prompt)} characters; this demo takes at most {self.limits.max_prompt_chars}. "
                "Shorten it."
            )
        return prompt

    def _check_pixels(self, width: int, height: int, what: str) -> None:
        if width * height > self.limits.max_pixels:
            raise InputRejected(
                f"The {what} is {width}×{height} = {width * height:,} pixels; this demo takes at most "
                f"{self.limits.max_pixels:,}. Downscale it and try again."
            )

    def load_image(self, path: str | os.PathLike) -> Image.Image:
        """Open an image file as RGB (EXIF orientation applied), checking its size before decoding the pixels."""
        path = Path(path)
        try:
            with Image.open(path) as opened:
                self._check_pixels(opened.width, opened.height, "image")
                image = ImageOps.exif_transpose(opened)
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InputRejected(
                f"Could not read {path.name!r} as an image ({type(error).__name__}: {error}). Upload a PNG, JPEG or "
                "WebP image, or a video (MP4, WebM)."
            ) from error
        return image

    def load_video(
        self, path: str | os.PathLike, check: Callable[[], None] = lambda: None
    ) -> tuple[list[np.ndarray], float]:
        """Decode every frame of a video file with PyAV, checking the frame size and count as it goes.

        Returns:
            `(frames, fps)`: `(H, W, 3)` uint8 arrays and the frame rate (25 when the file does not say).
        """
        import av

        path = Path(path)
        frames: list[np.ndarray] = []
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputRejected(f"{path.name!r} has no video stream. Upload a video with a picture track.")
                stream = container.streams.video[0]
                self._check_pixels(stream.codec_context.width, stream.codec_context.height, "video frame")
                if stream.frames and stream.frames > self.limits.max_frames:
                    raise self._too_many_frames(f"{stream.frames}")
                rate = stream.average_rate or stream.guessed_rate
                fps = float(rate) if rate else 25.0
                for frame in container.decode(stream):
                    check()
                    if len(frames) == self.limits.max_frames:
                        raise self._too_many_frames(f"more than {self.limits.max_frames}")
                    if not frames:  # the header's size can be missing: check the first decoded frame too
                        self._check_pixels(frame.width, frame.height, "video frame")
                    frames.append(frame.to_ndarray(format="rgb24"))
        except (av.error.FFmpegError, UnicodeDecodeError) as error:
            raise InputRejected(
                f"Could not read {path.name!r} as a video ({type(error).__name__}: {error}). Upload an MP4 or WebM "
                "video, or an image."
            ) from error
        if not frames:
            raise InputRejected(f"{path.name!r} holds no decodable frame. Upload another video.")
        return frames, fps

    def _too_many_frames(self, count: str) -> InputRejected:
        return InputRejected(
            f"The video has {count} frames; this demo takes at most {self.limits.max_frames}. Trim it and try again."
        )

    # -- running ------------------------------------------------------------------------------------------------

    def _job_folder(self) -> Path:
        with self._lock:
            self._job_counter += 1
            number = self._job_counter
        folder = self.output_dir / f"job-{number:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled("Cancelled.")

    def request_cancel(self, session: str | None = None) -> bool:
        """Ask the running job to stop at its next frame; only the session that started it may (`None`: any).
        Returns whether a job was asked to stop."""
        running = self._running_session
        if running is None or (session is not None and session != running):
            return False
        self._cancel.set()
        return True

    @contextmanager
    def _job(self, session: str | None) -> Iterator[None]:
        self._cancel.clear()
        self._running_session = session or "local"
        try:
            yield
        finally:
            self._running_session = None
            self._cancel.clear()

    def _segment(self, inputs, **kwargs):
        with torch.no_grad():
            return self.model.segment(**inputs, max_new_tokens=self.limits.max_new_tokens, **kwargs)

    def segment_image(self, path: str | os.PathLike, prompt: str) -> SegmentationResult:
        """Segment an image file: answer, masks `(num_objects, H, W)`, overlay, one PNG per object."""
        start = time.perf_counter()
        prompt = self.check_prompt(prompt)
        image = self.load_image(path)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        output = self._segment(inputs)
        masks = output.masks[0].cpu().numpy().astype(bool)
        folder = self._job_folder()
        mask_files = []
        for index, mask in enumerate(masks):
            mask_path = folder / f"mask_{index + 1}.png"
            mask_to_image(mask).save(mask_path)
            mask_files.append(mask_path)
        overlay = overlay_masks(image, list(masks))
        return SegmentationResult(
            kind="image",
            answer=self.processor.decode_answers(output.answer_ids)[0],
            masks=masks,
            scores=[float(score) for score in output.scores[0].float().cpu()],
            seconds=time.perf_counter() - start,
            overlay=overlay,
            mask_files=mask_files,
        )

    def segment_video(
        self, path: str | os.PathLike, prompt: str, progress: Callable[[float, str], None] | None = None
    ) -> SegmentationResult:
        """Segment a video file: answer, masks `(num_objects, T, H, W)`, overlay video, a ZIP of PNGs per object.

        `progress(fraction, description)` is called while frames are decoded, segmented and drawn; a cancel
        request (`request_cancel`) stops the job at the next frame with `JobCancelled`.
        """
        start = time.perf_counter()
        report = progress or (lambda fraction, description: None)
        prompt = self.check_prompt(prompt)
        report(0.0, "reading the video")
        frames, fps = self.load_video(path, check=self._check_cancelled)
        num_frames = len(frames)
        inputs = self.processor(videos=frames, text=prompt, return_tensors="pt")
        seen: set[int] = set()

        def on_read(index: int) -> None:
            self._check_cancelled()
            seen.add(index)
            report(0.1 + 0.7 * len(seen) / num_frames, f"segmenting frame {len(seen)}/{num_frames}")

        inputs["video_frames"] = _WatchedFrames(inputs["video_frames"], on_read)
        report(0.05, "answering")
        output = self._segment(inputs)
        masks = output.masks[0].cpu().numpy().astype(bool)  # (num_objects, T, H, W)
        folder = self._job_folder()

        def overlays() -> Iterator[Image.Image]:
            for index, frame in enumerate(frames):
                self._check_cancelled()
                report(0.8 + 0.2 * index / num_frames, f"drawing frame {index + 1}/{num_frames}")
                yield overlay_masks(Image.fromarray(frame), [masks[k, index] for k in range(masks.shape[0])])

        overlay_video = write_video(overlays(), folder / "overlay", fps)
        mask_files = []
        for obj in range(masks.shape[0]):
            archive = folder / f"masks_object_{obj + 1}.zip"
            with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
                for index in range(num_frames):
                    buffer = _png_bytes(mask_to_image(masks[obj, index]))
                    bundle.writestr(f"object_{obj + 1}/{index:05d}.png", buffer)
            mask_files.append(archive)
        return SegmentationResult(
            kind="video",
            answer=self.processor.decode_answers(output.answer_ids)[0],
            masks=masks,
            scores=[float(score) for score in output.scores[0].float().cpu()],
            seconds=time.perf_counter() - start,
            overlay_video=overlay_video,
            mask_files=mask_files,
            fps=fps,
        )

    def compare_cma(self, path: str | os.PathLike, prompt: str) -> CMAComparison:
        """Segment an image with the CMA as trained and with γ = 0; return both, their difference and the router's
        chosen tokens."""
        start = time.perf_counter()
        cma = getattr(self.model, "cma", None)
        if cma is None or not getattr(self.model.config, "use_cma", True):
            raise InputRejected("This model has no CMA (use_cma=False): there is nothing to compare.")
        prompt = self.check_prompt(prompt)
        image = self.load_image(path)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        captured: list[Any] = []
        handle = cma.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with_cma = self._segment(inputs)
        finally:
            handle.remove()
        with _gamma_zero(cma):
            without_cma = self._segment(inputs)
        masks_on = with_cma.masks[0].cpu().numpy().astype(bool)
        masks_off = without_cma.masks[0].cpu().numpy().astype(bool)
        routed = self._routed_tokens(inputs, captured[-1]) if captured and masks_on.shape[0] else []
        return CMAComparison(
            answer=self.processor.decode_answers(with_cma.answer_ids)[0],
            masks_with_cma=masks_on,
            masks_without_cma=masks_off,
            scores_with_cma=[float(s) for s in with_cma.scores[0].float().cpu()],
            scores_without_cma=[float(s) for s in without_cma.scores[0].float().cpu()],
            overlay_with_cma=overlay_masks(image, list(masks_on)),
            overlay_without_cma=overlay_masks(image, list(masks_off)),
            difference=difference_image(image, masks_on, masks_off),
            routed_tokens=routed,
            gamma=float(cma.gamma.detach().float().item()),
            seconds=time.perf_counter() - start,
        )

    def _routed_tokens(self, inputs, cma_output) -> list[list[RoutedToken]]:
        """Map the router's kept indices back to prompt tokens: the CMA's candidates are the prompt's text tokens
        (the positions of `text_token_mask`, in order) followed by the object's ``[SEG]`` embedding."""
        input_ids = inputs["input_ids"][0]
        text_mask = inputs.get("text_token_mask")
        if text_mask is None:
            raise InputRejected("the processor returned no text_token_mask; the router's tokens cannot be named")
        positions = text_mask[0].bool().nonzero(as_tuple=True)[0].tolist()
        tokenizer = getattr(self.processor, "tokenizer", None)
        probabilities = cma_output.router_scores.float().softmax(dim=-1)
        routed = []
        for obj in range(cma_output.selected_token_indices.shape[0]):
            kept = []
            for slot, index in enumerate(cma_output.selected_token_indices[obj].tolist()):
                if not bool(cma_output.selected_token_mask[obj, slot]):
                    continue
                if index < len(positions):
                    token_id = int(input_ids[positions[index]])
                    token = tokenizer.decode([token_id]).strip() if tokenizer is not None else str(token_id)
                else:
                    token = "[SEG]"
                kept.append(RoutedToken(token=token, probability=float(probabilities[obj, index])))
            routed.append(kept)
        return routed

    # -- page handlers --------------------------------------------------------------------------------------------

    def run_handler(self, image_path, video_path, prompt, request: gr.Request | None = None, progress=gr.Progress()):
        """Segment tab: `(answer, overlay image, overlay video, mask files, scores markdown, timing markdown)`."""
        session = getattr(request, "session_hash", None)
        with _page_errors(), self._job(session):
            if image_path and video_path:
                raise InputRejected("Give an image or a video, not both: clear one of them.")
            if not image_path and not video_path:
                raise InputRejected("Upload an image or a video first (or click an example).")
            if image_path:
                result = self.segment_image(image_path, prompt)
            else:
                result = self.segment_video(video_path, prompt, progress=lambda f, d: progress(f, desc=d))
        return (
            result.answer,
            result.overlay,
            None if result.overlay_video is None else str(result.overlay_video),
            [str(path) for path in result.mask_files] or None,
            scores_markdown(result.scores, result.masks),
            timing_markdown(result),
        )

    def cancel_handler(self, request: gr.Request | None = None) -> str:
        session = getattr(request, "session_hash", None)
        return "Cancelling…" if self.request_cancel(session) else "Nothing of yours is running."

    def compare_handler(self, image_path, prompt, progress=gr.Progress()):
        """CMA tab: `(overlay with CMA, overlay with γ = 0, difference, summary markdown)`."""
        with _page_errors(), self._job("compare"):
            if not image_path:
                raise InputRejected("Upload an image first (or click an example).")
            progress(0.0, desc="segmenting with and without the CMA")
            result = self.compare_cma(image_path, prompt)
        return result.overlay_with_cma, result.overlay_without_cma, result.difference, comparison_markdown(result)


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def _gamma_zero(cma) -> Iterator[None]:
    """The CMA's residual scale γ set to 0 inside the block (F' = F: SAM2's embedding unchanged), restored after."""
    saved = cma.gamma.detach().clone()
    with torch.no_grad():
        cma.gamma.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            cma.gamma.copy_(saved)


@contextmanager
def _page_errors() -> Iterator[None]:
    """Every failure as one line in the page: input problems and cancellation as they are; anything unexpected with
    its type and message (the traceback goes to the server's log, not the page)."""
    try:
        yield
    except (InputRejected, JobCancelled) as error:
        raise gr.Error(html.escape(str(error), quote=False), duration=None, print_exception=False) from error
    except gr.Error:
        raise
    except Exception as error:
        traceback.print_exc()
        message = html.escape(" ".join(str(error).split()) or "no message", quote=False)
        raise gr.Error(
            f"The model failed on this input: {type(error).__name__}: {message}", duration=None, print_exception=False
        ) from error


def difference_image(image: Image.Image, masks_on: np.ndarray, masks_off: np.ndarray) -> Image.Image:
    """The image in grey, with pixels only the CMA-on masks cover in `ONLY_WITH_CMA` and pixels only the CMA-off
    masks cover in `ONLY_WITHOUT_CMA` (objects merged)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    canvas = np.repeat((0.35 * grey + 120.0)[..., None], 3, axis=2)
    height, width = grey.shape
    on = masks_on.any(0) if masks_on.shape[0] else np.zeros((height, width), bool)
    off = masks_off.any(0) if masks_off.shape[0] else np.zeros((height, width), bool)
    canvas[on & ~off] = ONLY_WITH_CMA
    canvas[off & ~on] = ONLY_WITHOUT_CMA
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def scores_markdown(scores: Sequence[float], masks: np.ndarray) -> str:
    if not len(scores):
        return "The answer has no `[SEG]`: no object was segmented."
    area_axes = tuple(range(1, masks.ndim))
    areas = masks.sum(axis=area_axes) if masks.size else np.zeros(len(scores))
    rows = ["| object | colour | score (predicted IoU) | mask pixels |", "|---|---|---|---|"]
    for index, score in enumerate(scores):
        rows.append(f"| {index + 1} | {palette_hex(index)} | {score:.3f} | {int(areas[index]):,} |")
    return "\n".join(rows)


def timing_markdown(result: SegmentationResult) -> str:
    what = "image" if result.kind == "image" else f"video of {result.masks.shape[1]} frames"
    return f"Took {result.seconds:.2f} s ({what}, {result.num_objects} object(s))."


def comparison_markdown(result: CMAComparison) -> str:
    total = result.masks_with_cma.shape[-1] * result.masks_with_cma.shape[-2] if result.masks_with_cma.ndim == 3 else 0
    lines = [f"**Answer:** {html.escape(result.answer)}", ""]
    if result.masks_with_cma.shape[0] == 0:
        lines.append("The answer has no `[SEG]`: no object, nothing to compare.")
        return "\n".join(lines)
    share = 100.0 * result.differing_pixels / max(total, 1)
    lines.append(
        f"γ = {result.gamma:.4f}. **{result.differing_pixels:,} pixels differ** ({share:.2f} % of the image): green "
        "only with the CMA, magenta only without it."
    )
    lines.append("")
    lines.append("| object | score with CMA | score with γ = 0 | tokens the router kept (probability) |")
    lines.append("|---|---|---|---|")
    for index, tokens in enumerate(result.routed_tokens):
        kept = ", ".join(f"`{html.escape(t.token) or '␣'}` ({t.probability:.2f})" for t in tokens)
        lines.append(
            f"| {index + 1} | {result.scores_with_cma[index]:.3f} | {result.scores_without_cma[index]:.3f} | {kept} |"
        )
    lines.append("")
    lines.append(f"Took {result.seconds:.2f} s (two runs of the model).")
    return "\n".join(lines)


# -- the page ------------------------------------------------------------------------------------------------------


def offline_theme() -> gr.themes.Base:
    """Gradio's base theme with system fonts only: nothing is fetched from a font service."""
    return gr.themes.Base(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO_FONTS))


def build_blocks(demo: MaskCMADemo, examples: Sequence[Example] = ()) -> gr.Blocks:
    """The page: a Segment tab and a CMA-comparison tab over `demo`."""
    image_examples = [[example.path, example.prompt] for example in examples if not example.is_video]
    video_examples = [[example.path, example.prompt] for example in examples if example.is_video]
    with gr.Blocks(title="MaskCMA referring segmentation", analytics_enabled=False) as blocks:
        gr.Markdown(
            "# MaskCMA referring segmentation\n"
            f"Model: `{demo.model_name}`. Upload an image or a video, type what to segment, press **Segment**. "
            f"{demo.limits.describe()}"
        )
        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column():
                    image_in = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="image-input")
                    video_in = gr.Video(
                        label="Video (instead of an image)",
                        sources=["upload"],
                        include_audio=True,
                        elem_id="video-input",
                    )
                    prompt_in = gr.Textbox(
                        label="Prompt", placeholder="Please segment the red circle.", elem_id="prompt-input"
                    )
                    with gr.Row():
                        run_button = gr.Button("Segment", variant="primary", elem_id="run-button")
                        cancel_button = gr.Button("Cancel", elem_id="cancel-button")
                    status = gr.Markdown(elem_id="status")
                    if image_examples:
                        gr.Examples(image_examples, inputs=[image_in, prompt_in], label="Example images")
                    if video_examples:
                        gr.Examples(video_examples, inputs=[video_in, prompt_in], label="Example videos")
                with gr.Column():
                    answer_out = gr.Textbox(label="Answer", interactive=False, elem_id="answer-output")
                    overlay_out = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay-output")
                    video_out = gr.Video(label="Overlay video", interactive=False, elem_id="video-output")
                    masks_out = gr.File(label="Masks (PNG per object)", file_count="multiple", elem_id="mask-files")
                    scores_out = gr.Markdown(elem_id="scores-output")
                    timing_out = gr.Markdown(elem_id="timing-output")
            run_button.click(
                demo.run_handler,
                inputs=[image_in, video_in, prompt_in],
                outputs=[answer_out, overlay_out, video_out, masks_out, scores_out, timing_out],
                concurrency_limit=1,
                concurrency_id="model",
            )
            # not queued: it must reach the server while the job it cancels holds the queue; the job stops itself at
            # its next frame (Gradio's own `cancels=` would drop the event while its thread kept computing)
            cancel_button.click(demo.cancel_handler, outputs=[status], queue=False)
        with gr.Tab("CMA comparison"):
            gr.Markdown(
                "The same image segmented twice: with the CMA as trained, and with its residual scale γ forced to 0 "
                "(SAM2's image embedding left unchanged). The third image shows where the masks differ; the table "
                "lists the prompt tokens the CMA's router chose for each object."
            )
            with gr.Row():
                with gr.Column():
                    compare_image = gr.Image(
                        type="filepath", label="Image", sources=["upload"], elem_id="compare-input"
                    )
                with gr.Column():
                    compare_prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
                    compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                    summary = gr.Markdown(elem_id="compare-summary")
            with gr.Row():
                with_cma = gr.Image(label="With CMA", format="png", interactive=False, elem_id="with-cma")
                without_cma = gr.Image(label="CMA off (γ = 0)", format="png", interactive=False, elem_id="without-cma")
                difference = gr.Image(label="Difference", format="png", interactive=False, elem_id="difference")
            if image_examples:
                gr.Examples(image_examples, inputs=[compare_image, compare_prompt], label="Example images")
            compare_button.click(
                demo.compare_handler,
                inputs=[compare_image, compare_prompt],
                outputs=[with_cma, without_cma, difference, summary],
                concurrency_limit=1,
                concurrency_id="model",
            )
    blocks.queue(default_concurrency_limit=1, max_size=16)
    return blocks


def launch(blocks: gr.Blocks, host: str | None = None, port: int | None = None, **kwargs):
    """Serve the page (blocking unless `prevent_thread_lock=True`), offline: system fonts, no analytics."""
    return blocks.launch(server_name=host, server_port=port, theme=offline_theme(), show_error=True, **kwargs)


def read_examples(folder: str | os.PathLike) -> list[Example]:
    """Examples listed in `folder/examples.json` (`[{"file": NAME, "prompt": TEXT}, ...]`)."""
    folder = Path(folder)
    index = folder / "examples.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))
    return [Example(path=str(folder / entry["file"]), prompt=entry["prompt"]) for entry in entries]


def main(argv: Sequence[str] | None = None, default_model: str | None = None, examples_dir=None) -> None:
    """Entry point of the Space's `app.py`: `python app.py [--model ID] [--host H] [--port N]`. The model defaults to
    the `MASKCMA_MODEL` environment variable, then `default_model`."""
    parser = argparse.ArgumentParser(description="MaskCMA referring segmentation web demo")
    parser.add_argument("--model", default=os.environ.get("MASKCMA_MODEL", default_model))
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model: pass --model or set MASKCMA_MODEL")
    demo = MaskCMADemo.from_pretrained(args.model)
    examples = read_examples(examples_dir) if examples_dir is not None else []
    launch(build_blocks(demo, examples), host=args.host, port=args.port)
