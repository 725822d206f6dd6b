"""`maskcma predict` on an image, a frame folder and a video file: the files it writes, its JSON output and its
errors."""

import json

import av
import numpy as np
import pytest
from PIL import Image
from test_pipeline import ANSWER, IMAGE_PROMPT, NUM_VIDEO_FRAMES, VIDEO_PROMPT, build_answering_folder

from transformers_maskcma.cli import main
from transformers_maskcma.data.schema import decode_rle
from transformers_maskcma.processing.samples import sample_image_path
from transformers_maskcma.processing.visualize import PALETTE, mask_outline, overlay_masks


@pytest.fixture(scope="module")
def answering_folder(tmp_path_factory):
    return build_answering_folder(tmp_path_factory.mktemp("cli"))


def predict(*args):
    return main(["predict", *[str(a) for a in args]])


def test_overlay_blends_the_mask_colour_and_draws_the_outline():
    image = Image.new("RGB", (20, 16), (100, 100, 100))
    mask = np.zeros((16, 20), bool)
    mask[3:13, 5:15] = True  # a 10x10 square: 36 boundary pixels, 64 interior
    outline = mask_outline(mask)
    assert outline.sum() == 36 and outline[3, 5:15].all() and not outline[4:12, 6:14].any()
    overlay = np.asarray(overlay_masks(image, [mask], alpha=0.5)).astype(int)
    colour = np.array(PALETTE[0])
    assert (overlay[~mask] == 100).all()
    assert (overlay[outline] == colour).all()
    assert (overlay[mask & ~outline] == np.round(0.5 * 100 + 0.5 * colour)).all()
    with pytest.raises(ValueError, match=r"mask 0 has shape \(4, 4\) but the image is \(16, 20\)"):
        overlay_masks(image, [np.zeros((4, 4), bool)])


def test_predict_on_an_image_writes_the_mask_and_the_overlay(answering_folder, tmp_path, capsys):
    folder, _ = answering_folder
    out = tmp_path / "out"
    assert predict("--model", folder, "--text", IMAGE_PROMPT, sample_image_path(), "--output", out) == 0
    printed = capsys.readouterr().out
    assert f"answer: {ANSWER!r}" in printed and "1 object(s)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["mask_0.png", "maskcma_run.json", "overlay.png"]
    mask = np.asarray(Image.open(out / "mask_0.png")) > 0
    assert mask.shape == (128, 192) and mask.any()  # the trained model's mask of the red circle is not empty
    overlay = np.asarray(Image.open(out / "overlay.png").convert("RGB"))
    expected = overlay_masks(Image.open(sample_image_path()), [mask])
    assert np.array_equal(overlay, np.asarray(expected))

    assert predict("--model", folder, "--text", IMAGE_PROMPT, sample_image_path(), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["answer"] == ANSWER and summary["media_type"] == "image" and summary["files"] == []
    assert summary["original_size"] == [128, 192]
    assert len(summary["objects"]) == 1 and isinstance(summary["objects"][0]["score"], float)
    assert np.array_equal(decode_rle(summary["objects"][0]["rle"]), mask)


def test_predict_on_a_frame_folder_writes_every_frame_and_a_gif(answering_folder, tmp_path, capsys):
    folder, frames_folder = answering_folder
    out = tmp_path / "video"
    code = predict(
        "--model",
        folder,
        "--text",
        VIDEO_PROMPT,
        frames_folder,
        "--output",
        out,
        "--json",
        "--key-frames",
        "5",
        "--key-frame-sampling",
        "first",
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "writing frames" in captured.err  # the progress bar over frames
    summary = json.loads(captured.out)
    assert summary["answer"] == ANSWER and summary["num_frames"] == NUM_VIDEO_FRAMES
    mask_files = sorted((out / "masks" / "object_0").iterdir())
    assert [p.name for p in mask_files] == [f"{t:05d}.png" for t in range(NUM_VIDEO_FRAMES)]
    rles = summary["objects"][0]["rle"]
    assert len(rles) == NUM_VIDEO_FRAMES
    for path, rle in zip(mask_files, rles):
        assert np.array_equal(np.asarray(Image.open(path)) > 0, decode_rle(rle))
        assert decode_rle(rle).any()  # the target is present on every frame, and so is the mask
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == NUM_VIDEO_FRAMES and gif.size == (192, 128)
    assert str(out / "overlay.gif") in summary["files"]


def test_predict_on_a_video_file_writes_an_mp4_overlay(answering_folder, tmp_path, capsys):
    folder, frames_folder = answering_folder
    clip = tmp_path / "clip.mp4"
    container = av.open(str(clip), mode="w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 192, 128, "yuv420p"
    for path in sorted(frames_folder.iterdir()):
        for packet in stream.encode(av.VideoFrame.from_image(Image.open(path).convert("RGB"))):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    out = tmp_path / "mp4"
    assert predict("--model", folder, "--text", VIDEO_PROMPT, clip, "--output", out, "--overlay-format", "mp4") == 0
    capsys.readouterr()
    mask_files = sorted((out / "masks" / "object_0").iterdir())
    assert len(mask_files) == NUM_VIDEO_FRAMES
    assert all((np.asarray(Image.open(path)) > 0).any() for path in mask_files)  # the circle is in every frame
    with av.open(str(out / "overlay.mp4")) as written:
        codec = written.streams.video[0].codec_context.name
        frames = list(written.decode(video=0))
    # the one overlay writer (visualize.write_video): H.264, which browsers play, never MPEG-4 part 2
    assert codec == "h264"
    assert len(frames) == NUM_VIDEO_FRAMES and (frames[0].height, frames[0].width) == (128, 192)
    # the overlay's first frame shows the first frame with its mask drawn (within H.264's loss)
    first_mask = np.asarray(Image.open(mask_files[0])) > 0
    expected = np.asarray(overlay_masks(Image.open(sorted(frames_folder.iterdir())[0]).convert("RGB"), [first_mask]))
    assert np.abs(frames[0].to_ndarray(format="rgb24").astype(int) - expected.astype(int)).mean() < 8

    out_webm = tmp_path / "webm"
    assert predict("--model", folder, "--text", VIDEO_PROMPT, clip, "--output", out_webm, "--overlay-format", "webm") == 0
    capsys.readouterr()
    with av.open(str(out_webm / "overlay.webm")) as written:
        assert written.streams.video[0].codec_context.name == "vp9"
        assert sum(1 for _ in written.decode(video=0)) == NUM_VIDEO_FRAMES


def test_predict_reports_bad_inputs_by_name(answering_folder, tmp_path, capsys, monkeypatch):
    folder, _ = answering_folder
    monkeypatch.chdir(tmp_path)  # the default output folder
    assert predict("--model", folder, "--text", IMAGE_PROMPT, tmp_path / "nowhere.png") == 2
    assert "input" in (err := capsys.readouterr().err) and "nowhere.png" in err and "does not exist" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    assert predict("--model", folder, "--text", IMAGE_PROMPT, broken, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "maskcma predict: error: cannot read image file" in err and "broken.png" in err
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01" * 64)
    assert predict("--model", folder, "--text", VIDEO_PROMPT, junk) == 2
    assert "junk.mp4" in capsys.readouterr().err
    assert predict("--model", tmp_path / "no_model", "--text", IMAGE_PROMPT, sample_image_path()) == 2
    assert "model folder" in capsys.readouterr().err


def test_predict_output_folder_belongs_to_one_run(answering_folder, tmp_path, capsys):
    from transformers_maskcma.run_folder import RunFolder

    folder, _ = answering_folder
    out = tmp_path / "out"
    assert predict("--model", folder, "--text", IMAGE_PROMPT, sample_image_path(), "--output", out) == 0
    # an earlier run had two objects: its mask_1.png is recorded as written by it
    (out / "mask_1.png").write_bytes(b"stale")
    RunFolder.claim(out, command="predict", fingerprint=RunFolder.read_fingerprint(out), resume=True).record(
        "mask_1.png"
    )
    (out / "notes.txt").write_text("the user's own file")
    capsys.readouterr()

    other_prompt = "Please segment the blue square."
    assert predict("--model", folder, "--text", other_prompt, sample_image_path(), "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds another run" in err and "text:" in err and "--overwrite" in err
    assert predict("--model", folder, "--text", IMAGE_PROMPT, sample_image_path(), "--output", out) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err

    assert predict("--model", folder, "--text", other_prompt, sample_image_path(), "--output", out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["mask_0.png", "maskcma_run.json", "notes.txt", "overlay.png"]
    assert RunFolder.read_fingerprint(out)["text"] == other_prompt


def test_unwritable_output_is_found_before_the_model_is_loaded(answering_folder, tmp_path, capsys, monkeypatch):
    import transformers

    folder, _ = answering_folder

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_loading)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert predict("--model", folder, "--text", IMAGE_PROMPT, sample_image_path(), "--output", blocker / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be created" in err and str(blocker / "out") in err


def test_predict_on_several_inputs_in_batches_equals_one_at_a_time(answering_folder, tmp_path, capsys):
    from transformers_maskcma.processing.samples import draw_sample_shapes

    folder, frames_folder = answering_folder
    shifted = tmp_path / "shifted.png"
    image, _ = draw_sample_shapes("shapes")
    Image.fromarray(np.roll(np.asarray(image), 5, axis=1)).save(shifted)
    inputs = [sample_image_path(), frames_folder, shifted, sample_image_path("shapes_two_circles")]
    prompts = [IMAGE_PROMPT, VIDEO_PROMPT, "the red circle", IMAGE_PROMPT + " The round one, please."]
    out = tmp_path / "many"
    arguments = ["--model", folder, *inputs, "--output", out, "--json", "--batch-size", "3", "--key-frames", "5"]
    for prompt in prompts:
        arguments += ["--text", prompt]
    assert predict(*arguments) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [summary["input"] for summary in summaries] == [str(path) for path in inputs]
    assert [summary["media_type"] for summary in summaries] == ["image", "video", "image", "image"]
    names = ["000_shapes", "001_frames", "002_shifted", "003_shapes_two_circles"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "maskcma_run.json"])
    assert sorted(p.name for p in (out / names[0]).iterdir()) == ["mask_0.png", "overlay.png"]
    assert len(list((out / names[1] / "masks" / "object_0").iterdir())) == NUM_VIDEO_FRAMES
    # each input alone (batch size 1): the same answers, masks within the stated tolerance (IoU >= 0.999)
    for index, (path, prompt, summary) in enumerate(zip(inputs, prompts, summaries)):
        extra = ["--key-frames", "5"] if index == 1 else []
        assert predict("--model", folder, "--text", prompt, path, "--json", *extra) == 0
        alone = json.loads(capsys.readouterr().out)
        assert summary["answer"] == alone["answer"] == ANSWER
        assert summary["original_size"] == alone["original_size"]
        for mine, theirs in zip(summary["objects"], alone["objects"], strict=True):
            first = np.stack([decode_rle(rle) for rle in np.atleast_1d(mine["rle"])])
            second = np.stack([decode_rle(rle) for rle in np.atleast_1d(theirs["rle"])])
            assert first.any() and (first & second).sum() / (first | second).sum() >= 0.999
        if summary["media_type"] == "image":
            written = np.asarray(Image.open(out / names[index] / "mask_0.png")) > 0
            assert np.array_equal(written, decode_rle(summary["objects"][0]["rle"]))
    # --overwrite removes every input's folder (recorded in the manifest), and one --text serves every input
    assert predict("--model", folder, "--text", IMAGE_PROMPT, inputs[0], inputs[2], "--output", out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_shapes", "001_shifted", "maskcma_run.json"]
    capsys.readouterr()
    assert predict("--model", folder, "--text", "a", "--text", "b", *inputs, "--output", tmp_path / "bad") == 2
    assert "got 4 inputs but 2 prompts" in capsys.readouterr().err
    assert predict("--model", folder, "--text", "a", inputs[0], "--batch-size", "0", "--output", tmp_path / "b0") == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err
