"""The `referring-segmentation` pipeline on images and videos, in process and as remote code in a fresh process.

The tiny model has random weights; `build_answering_folder` fine-tunes its language model for a few steps on the
test inputs so that it answers "Sure, [SEG]." (one object), then saves a complete remote-code folder."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

from transformers_maskcma.processing import ReferringSegmentationPipeline, save_model_folder
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor
from transformers_maskcma.processing.samples import draw_sample_shapes, sample_image_path
from transformers_maskcma.trainer.collator import MaskCMADataCollator

IMAGE_PROMPT = "Please segment the red circle."
VIDEO_PROMPT = "Please segment the circle that moves right."
ANSWER = "Sure, [SEG]."
NUM_VIDEO_FRAMES = 7


def write_frame_folder(folder) -> list[np.ndarray]:
    """A 7-frame clip: the sample shapes with the red circle moving right by 6 px a frame. Returns the circle's
    mask in each frame."""
    folder.mkdir(parents=True, exist_ok=True)
    base, masks = draw_sample_shapes("shapes")
    circle_masks = []
    for t in range(NUM_VIDEO_FRAMES):
        frame = np.asarray(base).copy()
        frame[masks["red circle"]] = 128
        moved = np.roll(masks["red circle"], 6 * t, axis=1)
        frame[moved] = (220, 40, 40)
        Image.fromarray(frame).save(folder / f"{t:03d}.png")
        circle_masks.append(moved)
    return circle_masks


def build_answering_folder(root, steps: int = 20):
    """Tiny model + processor trained for a few steps on the sample image and the sample clip (the language model to
    answer "Sure, [SEG].", the mask decoder and its heads on the red circle's masks), saved with `save_model_folder`
    (remote code, processor, pipeline declaration). Returns `(folder, frames_folder)`."""
    frames_folder = root / "frames"
    circle_masks = write_frame_folder(frames_folder)
    model, tokenizer = build_tiny_model(seed=0)
    processor = build_tiny_processor(tokenizer)
    collator = MaskCMADataCollator(processor)
    image, masks = draw_sample_shapes("shapes")
    samples = [
        collator([processor(images=image, text=IMAGE_PROMPT, answer=ANSWER, masks=[masks["red circle"]])]),
        collator([processor(videos=str(frames_folder), text=VIDEO_PROMPT, answer=ANSWER, masks=[circle_masks])]),
    ]
    language_model = [p for p in model.vlm.parameters() if p.requires_grad]
    others = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("vlm.")]
    optimizer = torch.optim.Adam([{"params": language_model, "lr": 3e-3}, {"params": others, "lr": 1e-3}])
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        for batch in samples:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    folder = root / "model"
    save_model_folder(model, processor, folder)
    return folder, frames_folder


@pytest.fixture(scope="module")
def answering_folder(tmp_path_factory):
    return build_answering_folder(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def segmenter(answering_folder):
    folder, _ = answering_folder
    return pipeline("referring-segmentation", model=str(folder), trust_remote_code=True, device="cpu")


def test_saved_folder_declares_the_pipeline_for_remote_code(answering_folder):
    folder, _ = answering_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["referring-segmentation"]["impl"] == "pipeline.ReferringSegmentationPipeline"
    assert config["custom_pipelines"]["referring-segmentation"]["pt"] == ["AutoModel"]
    for name in ("pipeline.py", "processing_maskcma.py", "video_io.py", "image_io.py", "modeling_maskcma.py"):
        assert (folder / name).is_file(), name


def test_pipeline_on_an_image_matches_the_model(segmenter, answering_folder):
    folder, _ = answering_folder
    result = segmenter(str(sample_image_path()), text=IMAGE_PROMPT)
    assert result["answer"] == ANSWER
    assert len(result["masks"]) == 1 and len(result["scores"]) == 1
    mask = result["masks"][0]
    assert mask.dtype == bool and mask.shape == (128, 192)
    assert isinstance(result["scores"][0], float)
    _, shapes = draw_sample_shapes("shapes")
    assert (mask & shapes["red circle"]).any()  # the trained model's mask covers the target
    model = AutoModel.from_pretrained(folder)
    inputs = segmenter.processor(images=str(sample_image_path()), text=IMAGE_PROMPT)
    direct = model.segment(**inputs)
    assert segmenter.processor.decode_answers(direct.answer_ids) == [ANSWER]
    assert np.array_equal(direct.masks[0][0].numpy(), mask)
    assert result["scores"][0] == pytest.approx(float(direct.scores[0][0]))


def test_pipeline_on_a_video_gives_masks_for_every_frame(segmenter, answering_folder):
    _, frames_folder = answering_folder
    result = segmenter(str(frames_folder), text=VIDEO_PROMPT)
    assert result["answer"] == ANSWER
    assert len(result["masks"]) == 1
    assert result["masks"][0].shape == (NUM_VIDEO_FRAMES, 128, 192) and result["masks"][0].dtype == bool
    # the target is present on every frame: the mask is non-empty on key frames and propagated frames alike
    assert result["masks"][0].reshape(NUM_VIDEO_FRAMES, -1).any(axis=1).all()
    frames = [np.asarray(Image.open(frames_folder / f"{t:03d}.png")) for t in range(NUM_VIDEO_FRAMES)]
    as_list = segmenter({"video": frames, "text": VIDEO_PROMPT})
    assert np.array_equal(as_list["masks"][0], result["masks"][0])


def test_a_batch_of_inputs_needs_one_prompt_each(segmenter, answering_folder):
    _, frames_folder = answering_folder
    results = segmenter([str(sample_image_path()), str(frames_folder)], text=[IMAGE_PROMPT, VIDEO_PROMPT])
    assert [r["answer"] for r in results] == [ANSWER, ANSWER]
    assert results[0]["masks"][0].shape == (128, 192)
    assert results[1]["masks"][0].shape == (NUM_VIDEO_FRAMES, 128, 192)
    with pytest.raises(ValueError, match=r"got 2 inputs but 1 prompt\(s\)"):
        segmenter([str(sample_image_path()), str(frames_folder)], text=[IMAGE_PROMPT])
    with pytest.raises(ValueError, match=r"input 0: no prompt"):
        segmenter(str(sample_image_path()))


def test_bad_inputs_name_the_input(segmenter, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        segmenter(str(broken), text=IMAGE_PROMPT)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png"):
        segmenter(str(tmp_path / "nowhere.png"), text=IMAGE_PROMPT)


def test_registered_task_with_a_model_object_and_an_answer_without_seg(tiny_tokenizer):
    model, tokenizer = build_tiny_model(seed=1)  # random weights: this answer has no [SEG]
    processor = build_tiny_processor(tokenizer)
    segmenter = pipeline("referring-segmentation", model=model.eval(), processor=processor, device="cpu")
    assert isinstance(segmenter, ReferringSegmentationPipeline)
    inputs = processor(images=str(sample_image_path()), text=IMAGE_PROMPT)
    direct = model.segment(**inputs, max_new_tokens=4)
    assert direct.masks[0].shape[0] == 0  # the random model's answer has no [SEG]
    result = segmenter(str(sample_image_path()), text=IMAGE_PROMPT, max_new_tokens=4)
    assert result["masks"] == [] and result["scores"] == []


def test_remote_code_processor_model_and_pipeline_in_a_fresh_process(answering_folder, tmp_path):
    """AutoProcessor, AutoModel and pipeline(...) from the saved folder where `transformers_maskcma` cannot be
    imported; the results equal those of the package's own classes."""
    folder, frames_folder = answering_folder
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["transformers_maskcma"] = None  # the package must not be importable
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModel, AutoProcessor, pipeline
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        inputs = processor(images={str(sample_image_path())!r}, text={IMAGE_PROMPT!r})
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        segmenter = pipeline("referring-segmentation", model={str(folder)!r}, trust_remote_code=True, device="cpu")
        image = segmenter({str(sample_image_path())!r}, text={IMAGE_PROMPT!r})
        video = segmenter({str(frames_folder)!r}, text={VIDEO_PROMPT!r})
        print(json.dumps({{
            "classes": [type(c).__module__ for c in (processor, model, segmenter)],
            "input_ids": inputs["input_ids"].tolist(),
            "text_token_mask": inputs["text_token_mask"].tolist(),
            "sam_sum": float(inputs["sam_pixel_values"].double().sum()),
            "image": [image["answer"], [m.tolist() for m in image["masks"]]],
            "video": [video["answer"], [list(m.shape) for m in video["masks"]], int(video["masks"][0].sum())],
        }}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in remote["classes"]), remote["classes"]

    model = AutoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=str(sample_image_path()), text=IMAGE_PROMPT)
    assert remote["input_ids"] == inputs["input_ids"].tolist()
    assert remote["text_token_mask"] == inputs["text_token_mask"].tolist()
    assert remote["sam_sum"] == pytest.approx(float(inputs["sam_pixel_values"].double().sum()), rel=1e-9)
    expected = model.segment(**inputs)
    assert remote["image"][0] == ANSWER
    assert np.array_equal(np.array(remote["image"][1], dtype=bool), expected.masks[0].numpy())
    video = model.segment(**processor(videos=str(frames_folder), text=VIDEO_PROMPT))
    assert remote["video"][0] == ANSWER
    assert remote["video"][1] == [[NUM_VIDEO_FRAMES, 128, 192]]
    assert remote["video"][2] == int(video.masks[0][0].sum()) > 0
