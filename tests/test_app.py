"""The web demo's handlers (`app/ui.py`), its video writer, `maskcma app` start-up and `maskcma export --space`.

Every result is compared with the model's own `segment` on the same input; the real-browser tests are in
`tests/browser/` (`make test-browser`)."""

import ast
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import av
import gradio as gr
import numpy as np
import pytest
import torch
import yaml
from app_fixtures import (
    IMAGE_PROMPT,
    NO_OBJECT_PROMPT,
    build_app_model,
    decode_video,
    reference_segment,
    save_app_model,
)
from PIL import Image

from transformers_maskcma.app import ui
from transformers_maskcma.app.commands import DEFAULT_MODEL_DIR, resolve_model
from transformers_maskcma.app.examples import VIDEO_FPS, VIDEO_PROMPT, write_examples
from transformers_maskcma.cli import main
from transformers_maskcma.processing.samples import ASSETS_DIR
from transformers_maskcma.processing.visualize import BROWSER_VIDEO_CODECS, overlay_masks, write_video

SHAPES = ASSETS_DIR / "shapes.png"


@pytest.fixture(scope="module")
def model_and_processor():
    return build_app_model()


@pytest.fixture(scope="module")
def zero_gamma_model():
    """The same model with the CMA's γ = 0 (built independently of the app's γ switch)."""
    return build_app_model(gamma=0.0)


@pytest.fixture(scope="module")
def demo(model_and_processor, tmp_path_factory):
    model, processor = model_and_processor
    return ui.MaskCMADemo(model, processor, output_dir=tmp_path_factory.mktemp("app-out"), model_name="tiny")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("examples"))


def block_error(a: np.ndarray, b: np.ndarray, size: int = 4) -> float:
    """Mean absolute difference of the `size`×`size`-block means of two RGB frames."""

    def blocks(x):
        x = x.astype(np.float64)[: x.shape[0] // size * size, : x.shape[1] // size * size]
        return x.reshape(x.shape[0] // size, size, x.shape[1] // size, size, 3).mean(axis=(1, 3))

    return float(np.abs(blocks(a) - blocks(b)).mean())


@contextmanager
def count_model_calls(model):
    """A list that gets an entry for every forward call of the model or its VLM inside the block."""
    calls = []
    handles = [
        module.register_forward_pre_hook(lambda module, args: calls.append(1))
        for module in (model, model.vlm, model.sam2)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# -- image ---------------------------------------------------------------------------------------------------------


def test_image_handler_returns_the_models_answer_overlay_masks_and_scores(demo, model_and_processor):
    model, processor = model_and_processor
    image = Image.open(SHAPES).convert("RGB")
    answer, masks, scores = reference_segment(model, processor, image, IMAGE_PROMPT)
    assert masks.shape == (1, 128, 192) and masks.sum() > 0

    out_answer, overlay, video, files, scores_md, timing = demo.run_handler(str(SHAPES), None, IMAGE_PROMPT)

    assert out_answer == answer == "Sure, [SEG]."
    assert video is None
    np.testing.assert_array_equal(np.asarray(overlay), np.asarray(overlay_masks(image, list(masks))))
    assert [Path(f).name for f in files] == ["mask_1.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(files[0])) > 0, masks[0])
    assert f"| 1 | #ff3838 | {scores[0]:.3f} | {int(masks[0].sum()):,} |" in scores_md
    assert timing.startswith("Took ") and "image, 1 object(s)" in timing


def test_an_answer_without_seg_gives_no_mask_and_says_so(demo, model_and_processor):
    model, processor = model_and_processor
    image = Image.open(SHAPES).convert("RGB")
    answer, masks, _ = reference_segment(model, processor, image, NO_OBJECT_PROMPT)
    assert "[SEG]" not in answer and masks.shape[0] == 0

    out_answer, overlay, _, files, scores_md, timing = demo.run_handler(str(SHAPES), None, NO_OBJECT_PROMPT)

    assert out_answer == answer
    np.testing.assert_array_equal(np.asarray(overlay), np.asarray(image))  # nothing drawn
    assert files is None
    assert "no `[SEG]`" in scores_md and "0 object(s)" in timing


# -- video ---------------------------------------------------------------------------------------------------------


def test_video_handler_writes_a_browser_video_and_per_frame_masks_of_the_models_output(
    demo, model_and_processor, examples
):
    model, processor = model_and_processor
    video_file = examples / "moving_circle.webm"
    frames, fps = decode_video(video_file)
    assert len(frames) == 12 and fps == VIDEO_FPS
    answer, masks, _ = reference_segment(model, processor, frames, VIDEO_PROMPT)
    assert masks.shape == (1, 12, 128, 192) and masks[0, 0].sum() > 0  # the first key frame has the circle

    progress = []
    result = demo.segment_video(video_file, VIDEO_PROMPT, progress=lambda f, d: progress.append((f, d)))

    assert result.answer == answer
    np.testing.assert_array_equal(result.masks, masks)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0
    assert sum(d.startswith("segmenting frame") for _, d in progress) == 12
    assert progress[-1][1] == "drawing frame 12/12"
    # the overlay: VP9 in WebM, 12 frames at the clip's rate, each the overlay of the model's masks up to coding loss
    assert result.overlay_video.suffix == ".webm"
    with av.open(str(result.overlay_video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in {"vp9", "libvpx-vp9"}
        assert float(stream.average_rate) == VIDEO_FPS
    decoded, _ = decode_video(result.overlay_video)
    assert len(decoded) == 12
    # 4:2:0 chroma subsampling blurs colour at 2-px scale, so frames are compared as 4×4-block means
    error_overlay = block_error(decoded[0], np.asarray(overlay_masks(Image.fromarray(frames[0]), [masks[0, 0]])))
    assert error_overlay < 6.0 and error_overlay < 0.5 * block_error(decoded[0], frames[0])
    assert block_error(decoded[7], np.asarray(overlay_masks(Image.fromarray(frames[7]), [masks[0, 7]]))) < 6.0
    # one ZIP per object with a PNG per frame equal to the model's mask
    assert [p.name for p in result.mask_files] == ["masks_object_1.zip"]
    with zipfile.ZipFile(result.mask_files[0]) as bundle:
        names = sorted(bundle.namelist())
        assert names == [f"object_1/{t:05d}.png" for t in range(12)]
        for t, name in enumerate(names):
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(bundle.read(name)))) > 0, masks[0, t])


def test_cancel_stops_a_video_job_at_the_next_frame_and_the_next_job_runs(demo, examples):
    video_file = examples / "moving_circle.webm"
    reads = []

    def progress(fraction, description):
        if description.startswith("segmenting frame"):
            reads.append(description)
            if len(reads) == 3:
                assert demo.request_cancel("someone else") is False  # another session cannot cancel this job
                assert demo.request_cancel("me") is True

    with demo._job("me"):
        with pytest.raises(ui.JobCancelled):
            demo.segment_video(video_file, VIDEO_PROMPT, progress=progress)
    assert len(reads) == 3
    # through the page handler: the cancellation is one line in the page
    result = demo.segment_video(video_file, VIDEO_PROMPT)  # flag cleared: the next job runs to the end
    assert result.masks.shape[1] == 12
    assert demo.request_cancel("me") is False  # nothing running


def test_cancel_from_the_page_reaches_the_running_job(demo, examples):
    """The Cancel button's handler (not queued) stops the job the same session started."""
    started = threading.Event()
    release = threading.Event()
    original = demo.load_video

    def slow_load(path, check=lambda: None):
        started.set()
        release.wait(10)
        return original(path, check)

    request = gr.Request(session_hash="session-a")
    demo.load_video = slow_load
    errors = []
    try:
        thread = threading.Thread(
            target=lambda: _capture(
                errors, demo.run_handler, None, str(examples / "moving_circle.webm"), VIDEO_PROMPT, request
            )
        )
        thread.start()
        assert started.wait(10)
        assert demo.cancel_handler(gr.Request(session_hash="session-b")) == "Nothing of yours is running."
        assert demo.cancel_handler(request) == "Cancelling…"
        release.set()
        thread.join(30)
    finally:
        demo.load_video = original
    assert len(errors) == 1 and isinstance(errors[0], gr.Error) and errors[0].message == "Cancelled."


def _capture(errors, function, *args):
    try:
        function(*args)
    except Exception as error:  # recorded for the assertion in the test
        errors.append(error)


# -- bad input and limits ------------------------------------------------------------------------------------------


def test_bad_files_give_one_line_in_the_page(demo, tmp_path):
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("this is text")
    with pytest.raises(gr.Error, match=r"Could not read 'photo.png' as an image \(UnidentifiedImageError"):
        demo.run_handler(str(not_an_image), None, IMAGE_PROMPT)
    broken_video = tmp_path / "clip.mp4"
    broken_video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    with pytest.raises(gr.Error, match=r"Could not read 'clip.mp4' as a video") as raised:
        demo.run_handler(None, str(broken_video), IMAGE_PROMPT)
    assert "\n" not in raised.value.message
    with pytest.raises(gr.Error, match="Upload an image or a video first"):
        demo.run_handler(None, None, IMAGE_PROMPT)
    with pytest.raises(gr.Error, match="not both"):
        demo.run_handler(str(SHAPES), str(broken_video), IMAGE_PROMPT)
    with pytest.raises(gr.Error, match="Type a prompt first"):
        demo.run_handler(str(SHAPES), None, "   ")


def test_limits_are_checked_before_any_model_work(model_and_processor, examples, tmp_path):
    model, processor = model_and_processor
    limited = ui.MaskCMADemo(
        model,
        processor,
        limits=ui.AppLimits(max_pixels=192 * 127, max_frames=11, max_prompt_chars=20),
        output_dir=tmp_path,
    )
    frames_limited = ui.MaskCMADemo(model, processor, limits=ui.AppLimits(max_frames=11), output_dir=tmp_path)
    with count_model_calls(model) as calls:
        with pytest.raises(gr.Error, match=r"The image is 192×128 = 24,576 pixels; this demo takes at most 24,384\."):
            limited.run_handler(str(SHAPES), None, "the red circle")
        with pytest.raises(gr.Error, match=r"The video frame is 192×128 = 24,576 pixels"):
            limited.run_handler(None, str(examples / "moving_circle.webm"), "the red circle")
        with pytest.raises(gr.Error, match="The prompt has 30 characters; this demo takes at most 20"):
            limited.run_handler(str(SHAPES), None, IMAGE_PROMPT)
        # a WebM header holds no frame count: decoding stops at the first frame past the limit
        with pytest.raises(gr.Error, match="The video has more than 11 frames; this demo takes at most 11. Trim it"):
            frames_limited.run_handler(None, str(examples / "moving_circle.webm"), VIDEO_PROMPT)
    assert calls == []
    with count_model_calls(model) as calls:  # the hooks do count: a run within the limits calls the model
        frames_limited.run_handler(str(SHAPES), None, IMAGE_PROMPT)
    assert calls
    with pytest.raises(ValueError, match="AppLimits.max_frames must be an integer >= 1, got 0"):
        ui.AppLimits(max_frames=0)


def test_an_unexpected_failure_is_one_line_with_its_type(demo, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("shape mismatch\n  in layer 3")

    monkeypatch.setattr(demo.model, "segment", broken)
    with pytest.raises(gr.Error) as raised:
        demo.run_handler(str(SHAPES), None, IMAGE_PROMPT)
    assert raised.value.message == "The model failed on this input: RuntimeError: shape mismatch in layer 3"


# -- CMA comparison ------------------------------------------------------------------------------------------------


def test_cma_comparison_matches_the_model_with_and_without_gamma(demo, model_and_processor, zero_gamma_model):
    model, processor = model_and_processor
    image = Image.open(SHAPES).convert("RGB")
    gamma = float(model.cma.gamma.detach())
    _, masks_on, _ = reference_segment(model, processor, image, IMAGE_PROMPT)
    # independent γ = 0 model: the same weights with the CMA's residual scale zeroed in its state dict
    zeroed, _ = zero_gamma_model
    _, masks_off, _ = reference_segment(zeroed, processor, image, IMAGE_PROMPT)

    result = demo.compare_cma(SHAPES, IMAGE_PROMPT)

    assert float(model.cma.gamma.detach()) == gamma == result.gamma  # restored after the γ = 0 run
    np.testing.assert_array_equal(result.masks_with_cma, masks_on)
    np.testing.assert_array_equal(result.masks_without_cma, masks_off)
    differing = masks_on[0] != masks_off[0]
    assert result.differing_pixels == int(differing.sum()) > 0
    diff = np.asarray(result.difference)
    np.testing.assert_array_equal((diff == ui.ONLY_WITH_CMA).all(-1), masks_on[0] & ~masks_off[0])
    np.testing.assert_array_equal((diff == ui.ONLY_WITHOUT_CMA).all(-1), masks_off[0] & ~masks_on[0])
    assert f"**{int(differing.sum()):,} pixels differ**" in ui.comparison_markdown(result)


def test_router_tokens_are_the_top_k_of_the_routers_scores(demo, model_and_processor):
    """Independent of the forward hook: score the prompt tokens with the router's own projections."""
    model, processor = model_and_processor
    image = Image.open(SHAPES).convert("RGB")
    inputs = processor(images=image, text=IMAGE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        answer = model.generate_answer(
            inputs["input_ids"], inputs["attention_mask"], 32, inputs["pixel_values"], inputs["text_token_mask"]
        )
        seg = answer["seg_embeds"]
        text = answer["text_tokens"][0][answer["text_token_mask"][0]]
        candidates = torch.cat([text, seg], dim=0)
        router = model.cma.router
        scores = (router.query_proj(seg[0]) @ router.key_proj(candidates).T) * router.scale
    probabilities = scores.softmax(-1)
    top = scores.topk(model.config.cma_topk_tokens).indices.tolist()
    positions = inputs["text_token_mask"][0].nonzero(as_tuple=True)[0].tolist()
    names = [processor.tokenizer.decode([int(inputs["input_ids"][0, p])]).strip() for p in positions] + ["[SEG]"]

    result = demo.compare_cma(SHAPES, IMAGE_PROMPT)

    assert [t.token for t in result.routed_tokens[0]] == [names[i] for i in top]
    np.testing.assert_allclose([t.probability for t in result.routed_tokens[0]], probabilities[top].numpy(), atol=1e-5)


def test_cma_comparison_of_an_untrained_cma_shows_no_difference(zero_gamma_model, tmp_path):
    """Negative control: with γ = 0 already (a fresh CMA) both runs are the same model, so nothing differs."""
    fresh, processor = zero_gamma_model
    result = ui.MaskCMADemo(fresh, processor, output_dir=tmp_path).compare_cma(SHAPES, IMAGE_PROMPT)
    assert result.masks_with_cma.sum() > 0
    np.testing.assert_array_equal(result.masks_with_cma, result.masks_without_cma)
    assert result.differing_pixels == 0


# -- the page, its module and the video writer ----------------------------------------------------------------------


def test_the_page_builds_offline_with_one_job_at_a_time(demo, examples):
    blocks = ui.build_blocks(demo, ui.read_examples(examples))
    assert blocks.analytics_enabled is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    run = [fn for fn in blocks.fns.values() if fn.name == "run_handler"][0]
    cancel = [fn for fn in blocks.fns.values() if fn.name == "cancel_handler"][0]
    compare = [fn for fn in blocks.fns.values() if fn.name == "compare_handler"][0]
    assert run.concurrency_limit == 1 and run.concurrency_id == compare.concurrency_id == "model"
    assert cancel.queue is False
    theme = ui.offline_theme()
    assert not any(isinstance(font, gr.themes.GoogleFont) for font in [*theme._font, *theme._font_mono])
    assert theme._stylesheets == []


ALLOWED_IMPORTS = {"gradio", "numpy", "torch", "PIL", "transformers", "av", "__future__"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_app_module_needs_only_transformers_torch_gradio_and_pyav():
    stdlib = set(sys.stdlib_module_names)
    ui_imports = _imports(Path(ui.__file__))
    assert {name for name in ui_imports if name.split(".")[0] not in stdlib | ALLOWED_IMPORTS} == {
        "..processing.visualize"
    }
    visualize = Path(ui.__file__).parent.parent / "processing" / "visualize.py"
    allowed = stdlib | {"numpy", "PIL", "av", "__future__"}
    assert {name for name in _imports(visualize) if name.split(".")[0] not in allowed} == set()


def test_write_video_uses_a_codec_browsers_play(tmp_path):
    frames = [np.full((15, 21, 3), 10 * t, np.uint8) for t in range(5)]
    path = write_video(frames, tmp_path / "clip.mp4", fps=5)
    assert path.suffix == ".webm"  # the suffix follows the codec
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in {"vp9", "libvpx-vp9"}
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 5 and decoded[0].shape == (16, 22, 3)  # odd sizes padded to even
    for t in range(5):
        assert abs(float(decoded[t][:15, :21].mean()) - 10 * t) < 2.0
    h264 = write_video(frames, tmp_path / "clip", fps=5, codec="libx264")
    assert h264.suffix == ".mp4"
    assert "mpeg4" not in dict(BROWSER_VIDEO_CODECS)
    with pytest.raises(ValueError, match="codec 'mpeg4' is not one browsers play"):
        write_video(frames, tmp_path / "x", fps=5, codec="mpeg4")
    with pytest.raises(ValueError, match="no frame to write"):
        write_video([], tmp_path / "empty", fps=5)
    assert not (tmp_path / "empty.webm").exists()
    with pytest.raises(ValueError, match="frame 1 is 8x8 but the first frame is 22x16"):
        write_video([frames[0], np.zeros((8, 8, 3), np.uint8)], tmp_path / "mixed", fps=5)


# -- maskcma app -----------------------------------------------------------------------------------------------------


def test_maskcma_app_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["app"]) == 2
    error = capsys.readouterr().err
    assert "none at demo_output/model: run `make demo`" in error and "--model" in error
    (tmp_path / DEFAULT_MODEL_DIR).mkdir(parents=True)
    (tmp_path / DEFAULT_MODEL_DIR / "config.json").write_text("{}")
    assert resolve_model(None) == str(DEFAULT_MODEL_DIR)
    assert resolve_model("org/model") == "org/model"


def test_maskcma_app_reports_a_missing_model_folder(tmp_path, capsys):
    assert main(["app", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("maskcma app: error: ")


# -- maskcma export --space ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_with_space(tmp_path_factory):
    root = tmp_path_factory.mktemp("space-export")
    model_dir = save_app_model(root / "trained")
    code = main(["export", "--model", str(model_dir), "--output", str(root / "export"), "--repo-id",
                 "alice/maskcma-tiny", "--space", str(root / "space")])  # fmt: skip
    assert code == 0
    return root


def test_export_space_writes_a_space_folder_that_runs_the_same_app(exported_with_space):
    space = exported_with_space / "space"
    readme = (space / "README.md").read_text()
    metadata = yaml.safe_load(readme.split("---")[1])
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    assert metadata["sdk_version"] == gr.__version__ and metadata["models"] == ["alice/maskcma-tiny"]
    requirements = (space / "requirements.txt").read_text().split()
    assert {line.split("==")[0] for line in requirements} == {"transformers", "torch", "av", "numpy", "pillow"}
    assert (space / "maskcma_demo/app/ui.py").read_bytes() == Path(ui.__file__).read_bytes()
    visualize = Path(ui.__file__).parent.parent / "processing" / "visualize.py"
    assert (space / "maskcma_demo/processing/visualize.py").read_bytes() == visualize.read_bytes()
    assert 'main(default_model="alice/maskcma-tiny"' in (space / "app.py").read_text()
    entries = json.loads((space / "examples" / "examples.json").read_text())
    assert [e["file"] for e in entries] == ["shapes.png", "shapes_two_circles.png", "moving_circle.webm"]


def test_the_space_app_runs_without_this_package(exported_with_space, model_and_processor, tmp_path):
    """The Space's module, imported with `transformers_maskcma` made unimportable, loads the exported repo through
    remote code and segments like the package's model."""
    space, export = exported_with_space / "space", exported_with_space / "export"
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.modules["transformers_maskcma"] = None  # any import of the package fails
        sys.path.insert(0, {str(space)!r})
        import torch
        torch.set_num_threads(1)
        from maskcma_demo.app import ui
        demo = ui.MaskCMADemo.from_pretrained({str(export)!r}, output_dir={str(tmp_path)!r})
        assert not type(demo.model).__module__.startswith("transformers_maskcma"), type(demo.model).__module__
        result = demo.segment_image({str(space / "examples" / "shapes.png")!r}, {IMAGE_PROMPT!r})
        print(json.dumps({{"answer": result.answer, "mask": result.masks.astype(int).tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = json.loads(completed.stdout.strip().splitlines()[-1])
    model, processor = model_and_processor
    answer, masks, _ = reference_segment(model, processor, Image.open(SHAPES).convert("RGB"), IMAGE_PROMPT)
    assert output["answer"] == answer
    np.testing.assert_array_equal(np.array(output["mask"], dtype=bool), masks)


def test_the_model_card_links_the_space_and_shows_the_example_overlays(exported_with_space, model_and_processor):
    export = exported_with_space / "export"
    card = (export / "README.md").read_text()
    assert "[alice/maskcma-tiny-demo](https://huggingface.co/spaces/alice/maskcma-tiny-demo)" in card
    assert "| Please segment the red circle. | Sure, [SEG]. | ![overlay](examples/overlay_1.png) |" in card
    model, processor = model_and_processor
    image = Image.open(SHAPES).convert("RGB")
    _, masks, _ = reference_segment(model, processor, image, IMAGE_PROMPT)
    np.testing.assert_array_equal(
        np.asarray(Image.open(export / "examples" / "overlay_1.png")), np.asarray(overlay_masks(image, list(masks)))
    )
    assert (export / "examples" / "overlay_2.png").is_file()


def test_export_space_refuses_a_used_folder_before_writing(exported_with_space, tmp_path, capsys):
    used = tmp_path / "space"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    code = main(["export", "--model", str(exported_with_space / "trained"), "--output", str(tmp_path / "out"),
                 "--space", str(used)])  # fmt: skip
    assert code == 2
    assert f"{used} is not empty; give --space an empty or new folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
