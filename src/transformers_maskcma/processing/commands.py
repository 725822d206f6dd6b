"""``maskcma predict``: segment what a prompt refers to in an image, a video file or a folder of frames.

``maskcma predict --model FOLDER --text "..." INPUT [INPUT ...] [--batch-size N] [--output DIR] [--overwrite]
[--json] [--key-frames N] [--key-frame-sampling first|uniform] [--max-new-tokens N] [--threshold T]
[--overlay-format gif|mp4|webm] [--device D] [--threads N]``

Images: ``DIR/mask_<k>.png`` per object (white = object) and ``DIR/overlay.png``. Videos: ``DIR/masks/object_<k>/
<frame>.png`` per object and frame, and ``DIR/overlay.gif`` (or ``.mp4`` H.264 / ``.webm`` VP9, written by
`visualize.write_video` with the encoders browsers play). ``--json`` prints the answer, the scores and every mask
as COCO RLE (``masks[object]`` for an image, ``masks[object][frame]`` for a video) to stdout; with ``--json`` and no
``--output`` no file is written. Without either, files go to ``./maskcma_predictions``.

Several inputs (one ``--text`` for all, or one ``--text`` per input, in order) load the model once and write into
``DIR/<index>_<name>/`` each; ``--json`` prints a list. ``--batch-size N`` puts N images through one model call
(videos go one at a time); the masks equal batch size 1 within IoU 0.999 and the answers are the same
(docs/evaluation.md).

The output folder belongs to one prediction (``maskcma_run.json`` records the model, input and settings, and the
files written): a folder holding another run, or files that are not a maskcma run's, is refused before the model is
loaded; ``--overwrite`` first removes the files the earlier prediction wrote (and nothing else). An output folder
that cannot be written is found before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..run_folder import RunFolder, check_weight_files, model_fingerprint
from .pipeline import infer_media_type
from .video_io import KEY_FRAME_SAMPLINGS
from .visualize import BROWSER_VIDEO_CODECS, mask_to_image, overlay_masks, write_video

DEFAULT_OUTPUT = "maskcma_predictions"
OVERLAY_FORMATS = ("gif", "mp4", "webm")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment the object a prompt refers to in an image, a video file or a folder of frames",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        nargs="+",
        help="an image file, a video file (decoded with PyAV) or a folder of frame images; several inputs write into "
        "OUTPUT/<index>_<name>/ each",
    )
    parser.add_argument("--model", required=True, help="a saved MaskCMA folder (save_pretrained / maskcma export)")
    parser.add_argument(
        "--text",
        required=True,
        action="append",
        help="the referring prompt, e.g. 'Please segment the red circle.'; once for every input, or once per input",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per model call (default 1); videos go one at a time. Masks equal batch size 1 within IoU 0.999",
    )
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
        summaries = run_predict_many(
            model_path=args.model,
            texts=args.text,
            input_paths=args.input,
            output_dir=args.output if (args.output or args.json) else DEFAULT_OUTPUT,
            batch_size=args.batch_size,
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
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries))
        return 0
    for summary in summaries:
        scores = ", ".join(f"{obj['score']:.3f}" for obj in summary["objects"]) or "none"
        if len(summaries) > 1:
            print(f"{summary['input']}:")
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
    return run_predict_many(
        model_path, [text], [input_path], output_dir, key_frames=key_frames, key_frame_sampling=key_frame_sampling,
        max_new_tokens=max_new_tokens, threshold=threshold, overlay_format=overlay_format, fps=fps, device=device,
        with_rle=with_rle, overwrite=overwrite, show_progress=show_progress,
    )[0]


def _input_folder_name(index: int, path: Path) -> str:
    """`<index>_<name>`: the output subfolder of one of several inputs."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", path.stem if path.is_file() else path.name) or "input"
    return f"{index:03d}_{stem}"


def run_predict_many(
    model_path: str | os.PathLike,
    texts: Sequence[str],
    input_paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike | None,
    batch_size: int = 1,
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
) -> list[dict]:
    """Run a saved model on several inputs (the model is loaded once) and write each one's masks and overlays.

    Args:
        texts: one prompt for every input, or one per input.
        input_paths: images, video files or frame folders. One input writes into `output_dir` itself (as
            `run_predict`); several write into `output_dir/<index>_<name>/` each.
        batch_size: images per processor call and `model.segment` call (prompts left-padded, each image with its
            tiles and original size; masks equal batch size 1 within IoU 0.999, answers identical:
            docs/evaluation.md). Videos go one at a time.
        other arguments: as `run_predict`.

    Returns:
        one summary dict per input (see `run_predict`), in input order.
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    paths = [Path(path) for path in input_paths]
    if not paths:
        raise ValueError("no input given; pass an image, a video file or a folder of frames")
    prompts = list(texts) * len(paths) if len(texts) == 1 else list(texts)
    if len(prompts) != len(paths):
        raise ValueError(
            f"got {len(paths)} inputs but {len(texts)} prompts; pass one --text for every input, or one per input"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input {str(path)!r} does not exist (pass an image, a video file or a folder)")
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder {str(model_path)!r} does not exist (pass a folder saved by maskcma)")
    if overlay_format not in OVERLAY_FORMATS:
        raise ValueError(f"overlay_format={overlay_format!r} is not valid; use one of {list(OVERLAY_FORMATS)}")
    media_types = [infer_media_type(path) for path in paths]
    any_video = "video" in media_types
    codec = _overlay_codec(overlay_format) if any_video and output_dir is not None else None
    check_weight_files(model_path)
    single = len(paths) == 1
    folder = None
    if output_dir is not None:  # claimed before any work: a used or unwritable folder fails here
        resolved = [str(path.resolve()) for path in paths]
        fingerprint = {
            "model": model_fingerprint(model_path),
            "input": resolved[0] if single else resolved,
            "text": prompts[0] if single else prompts,
            "key_frames": key_frames,
            "key_frame_sampling": key_frame_sampling,
            "max_new_tokens": max_new_tokens,
            "threshold": threshold,
            "overlay_format": overlay_format if any_video else None,
            "fps": fps if any_video else None,
        }
        folder = RunFolder.claim(output_dir, command="predict", fingerprint=fingerprint, overwrite=overwrite)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)

    def segment(inputs, **extra):
        inputs = dict(inputs)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                inputs[key] = value.to(device=device, dtype=model.dtype) if value.is_floating_point() else value.to(device)
        if "video_frames" in inputs:
            inputs["video_frames"] = inputs["video_frames"].to(device=device, dtype=model.dtype)
        with torch.inference_mode():
            return inputs, model.segment(**inputs, **extra, max_new_tokens=max_new_tokens, mask_threshold=threshold)

    def target(index: int) -> Path | None:
        if folder is None:
            return None
        if single:
            return folder.path
        name = _input_folder_name(index, paths[index])
        folder.record(name)  # recorded before writing, so that --overwrite also removes what a crashed run left
        (folder.path / name).mkdir(exist_ok=True)
        return folder.path / name

    summaries: list[dict | None] = [None] * len(paths)
    images = [index for index, media in enumerate(media_types) if media == "image"]
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs, output = segment(processor(images=[paths[k] for k in chunk], text=[prompts[k] for k in chunk]))
        for row, index in enumerate(chunk):
            summaries[index] = _finish_input(
                processor, output, row, inputs["original_sizes"][row], paths[index], "image", target(index),
                folder, with_rle, overlay_format, fps, codec, show_progress, frame_source=None,
            )
    for index, media in enumerate(media_types):
        if media != "video":
            continue
        video = processor(
            videos=paths[index], text=prompts[index], num_key_frames=key_frames, key_frame_sampling=key_frame_sampling
        )
        frame_source = video["video_frames"].frames
        try:
            inputs, output = segment(video, show_progress=show_progress)
            summaries[index] = _finish_input(
                processor, output, 0, inputs["original_sizes"][0], paths[index], "video", target(index), folder,
                with_rle, overlay_format, fps, codec, show_progress, frame_source=frame_source,
            )
        finally:
            frame_source.close()
    return summaries


def _finish_input(
    processor, output, row: int, original_size, input_path: Path, media_type: str, output_dir: Path | None,
    folder: RunFolder | None, with_rle: bool, overlay_format: str, fps: float, codec: str | None,
    show_progress: bool, frame_source,
) -> dict:
    """The summary of sample `row` of a `segment` output, and its files written into `output_dir` (when given)."""
    masks = output.masks[row].cpu().numpy().astype(bool)  # (n, H, W) or (n, T, H, W)
    scores = [float(s) for s in output.scores[row].float().cpu()]
    answer = processor.decode_answers([output.answer_ids[row]])[0]
    summary = {
        "input": str(input_path),
        "media_type": media_type,
        "answer": answer,
        "original_size": [int(v) for v in original_size.tolist()],
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
    if output_dir is not None:
        prefix = Path(output_dir).relative_to(folder.path)
        # recorded before writing, so that --overwrite also removes what a crashed run left
        if media_type == "image":
            folder.record(*[prefix / f"mask_{k}.png" for k in range(masks.shape[0])], prefix / "overlay.png")
            summary["files"] = _write_image_outputs(processor, input_path, masks, output_dir)
        else:
            folder.record(prefix / "masks", prefix / f"overlay.{overlay_format}")
            summary["files"] = _write_video_outputs(
                frame_source, masks, output_dir, overlay_format, fps, codec, show_progress=show_progress
            )
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


def _overlay_codec(overlay_format: str) -> str | None:
    """The encoder of `visualize.BROWSER_VIDEO_CODECS` for a video overlay format (`None` for a GIF); checked before
    the model is loaded."""
    if overlay_format == "gif":
        return None
    import av

    candidates = [codec for codec, suffix in BROWSER_VIDEO_CODECS if suffix == f".{overlay_format}"]
    for codec in candidates:
        if codec in av.codecs_available:
            return codec
    raise ValueError(
        f"--overlay-format {overlay_format} needs one of the encoders {candidates}, which the installed PyAV "
        f"{av.__version__} lacks; use --overlay-format gif, or install a PyAV wheel with them (PyPI's have them)"
    )


def _write_video_outputs(
    frames,
    masks: np.ndarray,
    output_dir: Path,
    overlay_format: str,
    fps: float,
    codec: str | None,
    show_progress: bool = True,
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
        overlay_path = write_video(overlays(), overlay_path, fps, codec=codec)
    files.append(str(overlay_path))
    return files


__all__ = ["register", "run_predict"]
