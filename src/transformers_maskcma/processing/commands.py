"""``maskcma predict``: segment what a prompt refers to in an image, a video file or a folder of frames.

``maskcma predict --model FOLDER --text "..." INPUT [--output DIR] [--overwrite] [--json] [--key-frames N]
[--key-frame-sampling first|uniform] [--max-new-tokens N] [--threshold T] [--overlay-format gif|mp4] [--device D]
[--threads N]``

Images: ``DIR/mask_<k>.png`` per object (white = object) and ``DIR/overlay.png``. Videos: ``DIR/masks/object_<k>/
<frame>.png`` per object and frame, and ``DIR/overlay.gif`` (or ``.mp4``, written with PyAV). ``--json`` prints the
answer, the scores and every mask as COCO RLE (``masks[object]`` for an image, ``masks[object][frame]`` for a video)
to stdout; with ``--json`` and no ``--output`` no file is written. Without either, files go to
``./maskcma_predictions``.

The output folder belongs to one prediction (``maskcma_run.json`` records the model, input and settings, and the
files written): a folder holding another run, or files that are not a maskcma run's, is refused before the model is
loaded; ``--overwrite`` first removes the files the earlier prediction wrote (and nothing else). An output folder
that cannot be written is found before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..run_folder import RunFolder, check_weight_files, model_fingerprint
from .pipeline import infer_media_type
from .video_io import KEY_FRAME_SAMPLINGS
from .visualize import mask_to_image, overlay_masks

DEFAULT_OUTPUT = "maskcma_predictions"
OVERLAY_FORMATS = ("gif", "mp4")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment the object a prompt refers to in an image, a video file or a folder of frames",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="an image file, a video file (decoded with PyAV) or a folder of frame images")
    parser.add_argument("--model", required=True, help="a saved MaskCMA folder (save_pretrained / maskcma export)")
    parser.add_argument("--text", required=True, help="the referring prompt, e.g. 'Please segment the red circle.'")
    parser.add_argument("--output", default=None, help=f"output folder (default ./{DEFAULT_OUTPUT} unless --json)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier prediction in --output (removes only the files it wrote)",
    )
    parser.add_argument("--json", action="store_true", help="print the answer, scores and RLE masks as JSON")
    parser.add_argument("--key-frames", type=int, default=None, help="key frames the VLM sees (default: processor's)")
    parser.add_argument("--key-frame-sampling", choices=KEY_FRAME_SAMPLINGS, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    parser.add_argument("--threshold", type=float, default=None, help="mask logit threshold (default: the model's)")
    parser.add_argument("--overlay-format", choices=OVERLAY_FORMATS, default="gif", help="video overlay format")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the video overlay (default 10)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    try:
        summary = run_predict(
            model_path=args.model,
            text=args.text,
            input_path=args.input,
            output_dir=args.output if (args.output or args.json) else DEFAULT_OUTPUT,
            key_frames=args.key_frames,
            key_frame_sampling=args.key_frame_sampling,
            max_new_tokens=args.max_new_tokens,
            threshold=args.threshold,
            overlay_format=args.overlay_format,
            fps=args.fps,
            device=args.device,
            with_rle=args.json,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"maskcma predict: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        scores = ", ".join(f"{obj['score']:.3f}" for obj in summary["objects"]) or "none"
        print(f"answer: {summary['answer']!r}")
        print(f"{len(summary['objects'])} object(s), scores: {scores}")
        print(f"wrote {len(summary['files'])} file(s) to {summary['output']}")
    return 0


def run_predict(
    model_path: str | os.PathLike,
    text: str,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike | None,
    key_frames: int | None = None,
    key_frame_sampling: str | None = None,
    max_new_tokens: int = 32,
    threshold: float | None = None,
    overlay_format: str = "gif",
    fps: float = 10.0,
    device: str | None = None,
    with_rle: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Run a saved model on one input and write the masks and overlays.

    The output folder is claimed for this prediction first (`run_folder.RunFolder`, module docstring); with
    `overwrite`, an earlier prediction's files are removed. A video shows a progress bar over its frames
    (`show_progress`).

    Returns:
        a summary dict: `input`, `media_type`, `answer`, `original_size` `[H, W]`, `num_frames` (videos), `objects`
        (per object: `index`, `score` and, with `with_rle`, `rle`: one RLE for an image, a list per frame for a
        video), `output` and `files` (paths written).
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    input_path = Path(input_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input {str(input_path)!r} does not exist (pass an image, a video file or a folder)")
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder {str(model_path)!r} does not exist (pass a folder saved by maskcma)")
    if overlay_format not in OVERLAY_FORMATS:
        raise ValueError(f"overlay_format={overlay_format!r} is not valid; use one of {list(OVERLAY_FORMATS)}")
    media_type = infer_media_type(input_path)
    check_weight_files(model_path)
    folder = None
    if output_dir is not None:  # claimed before any work: a used or unwritable folder fails here
        fingerprint = {
            "model": model_fingerprint(model_path),
            "input": str(input_path.resolve()),
            "text": text,
            "key_frames": key_frames,
            "key_frame_sampling": key_frame_sampling,
            "max_new_tokens": max_new_tokens,
            "threshold": threshold,
            "overlay_format": overlay_format if media_type == "video" else None,
            "fps": fps if media_type == "video" else None,
        }
        folder = RunFolder.claim(output_dir, command="predict", fingerprint=fingerprint, overwrite=overwrite)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)

    if media_type == "video":
        inputs = processor(
            videos=input_path, text=text, num_key_frames=key_frames, key_frame_sampling=key_frame_sampling
        )
    else:
        inputs = processor(images=input_path, text=text)
    inputs = dict(inputs)
    dtype = model.dtype
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            inputs[key] = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    frame_source = None
    if "video_frames" in inputs:
        frame_source = inputs["video_frames"].frames
        inputs["video_frames"] = inputs["video_frames"].to(device=device, dtype=dtype)
    if frame_source is not None:
        inputs["show_progress"] = show_progress
    with torch.inference_mode():
        output = model.segment(**inputs, max_new_tokens=max_new_tokens, mask_threshold=threshold)
    masks = output.masks[0].cpu().numpy().astype(bool)  # (n, H, W) or (n, T, H, W)
    scores = [float(s) for s in output.scores[0].float().cpu()]
    answer = processor.decode_answers(output.answer_ids)[0]

    summary = {
        "input": str(input_path),
        "media_type": media_type,
        "answer": answer,
        "original_size": [int(v) for v in inputs["original_sizes"][0].tolist()],
        "objects": [{"index": k, "score": scores[k]} for k in range(masks.shape[0])],
        "output": None if output_dir is None else str(output_dir),
        "files": [],
    }
    if media_type == "video":
        summary["num_frames"] = int(masks.shape[1]) if masks.ndim == 4 else len(frame_source)
    if with_rle:
        from ..data.schema import encode_rle

        for k, obj in enumerate(summary["objects"]):
            obj["rle"] = encode_rle(masks[k]) if media_type == "image" else [encode_rle(m) for m in masks[k]]
    if folder is not None:
        output_dir = folder.path
        # recorded before writing, so that --overwrite also removes what a crashed run left
        if media_type == "image":
            folder.record(*[f"mask_{k}.png" for k in range(masks.shape[0])], "overlay.png")
            summary["files"] = _write_image_outputs(processor, input_path, masks, output_dir)
        else:
            folder.record("masks", f"overlay.{overlay_format}")
            summary["files"] = _write_video_outputs(
                frame_source, masks, output_dir, overlay_format, fps, show_progress=show_progress
            )
    if frame_source is not None:
        frame_source.close()
    return summary


def _write_image_outputs(processor, input_path: Path, masks: np.ndarray, output_dir: Path) -> list[str]:
    from .image_io import load_image

    image = load_image(input_path)
    files = []
    for k, mask in enumerate(masks):
        path = output_dir / f"mask_{k}.png"
        mask_to_image(mask).save(path)
        files.append(str(path))
    overlay_path = output_dir / "overlay.png"
    overlay_masks(image, list(masks)).save(overlay_path)
    files.append(str(overlay_path))
    return files


def _write_video_outputs(
    frames, masks: np.ndarray, output_dir: Path, overlay_format: str, fps: float, show_progress: bool = True
) -> list[str]:
    """Per-frame mask PNGs and the overlay video; `masks` is `(num_objects, T, H, W)`."""
    num_frames = len(frames)
    files: list[str] = []
    for k in range(masks.shape[0]):
        (output_dir / "masks" / f"object_{k}").mkdir(parents=True, exist_ok=True)

    def overlays() -> Iterator:
        for t in tqdm(range(num_frames), desc="writing frames", unit="frame", disable=not show_progress):
            frame_masks = [masks[k, t] for k in range(masks.shape[0])]
            for k, mask in enumerate(frame_masks):
                path = output_dir / "masks" / f"object_{k}" / f"{t:05d}.png"
                mask_to_image(mask).save(path)
                files.append(str(path))
            yield overlay_masks(frames[t], frame_masks)

    overlay_path = output_dir / f"overlay.{overlay_format}"
    if overlay_format == "gif":
        stream = overlays()
        first = next(stream)
        duration = max(int(round(1000.0 / fps)), 20)
        first.save(overlay_path, save_all=True, append_images=stream, duration=duration, loop=0)
    else:
        _write_mp4(overlays(), overlay_path, fps)
    files.append(str(overlay_path))
    return files


def _write_mp4(images: Iterator, path: Path, fps: float) -> None:
    """Encode RGB PIL images to an MP4 with PyAV (H.264 when available, else MPEG-4 part 2); odd sizes are padded
    by one pixel to the even size YUV 4:2:0 needs."""
    from fractions import Fraction

    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    container = av.open(str(path), mode="w")
    try:
        stream = None
        for image in images:
            array = np.asarray(image.convert("RGB"))
            height, width = array.shape[:2]
            array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = array.shape[1], array.shape[0]
                stream.pix_fmt = "yuv420p"
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    finally:
        container.close()


__all__ = ["register", "run_predict"]
