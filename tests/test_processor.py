"""MaskCMAProcessor: layout of the prompt, labels and masks in training mode, save/load (also as remote code),
records, post-processing and every bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor

from transformers_maskcma.data.schema import encode_rle
from transformers_maskcma.modeling import MaskCMAConfig
from transformers_maskcma.modeling.mask_decoding import upsample_mask_logits
from transformers_maskcma.tiny import TINY_IMAGE_SEQ_LENGTH, TINY_SEG_TOKEN_ID, build_tiny_processor, tiny_config
from transformers_maskcma.processing import MaskCMAProcessor, default_answer
from transformers_maskcma.processing.samples import draw_sample_shapes

PROMPT = "Please segment the red circle."
IMAGE_BLOCK = "<img>" + "<IMG_CONTEXT>" * TINY_IMAGE_SEQ_LENGTH + "</img>"


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return build_tiny_processor(tiny_tokenizer)


@pytest.fixture(scope="module")
def shapes():
    return draw_sample_shapes("shapes")


def tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# -- sizes and layout ------------------------------------------------------------------------------------------------


def test_from_model_config_takes_the_sizes_of_the_tiny_and_the_real_configuration(processor, tiny_tokenizer):
    assert processor.image_processor.size == {"height": 64, "width": 64}
    assert (processor.image_seq_length, processor.sam_image_size, processor.gt_mask_size) == (16, 128, 32)
    assert processor.max_length == 1024
    assert processor.seg_token_id == TINY_SEG_TOKEN_ID
    real = MaskCMAProcessor.from_model_config(MaskCMAConfig(), tiny_tokenizer, max_image_tiles=6)
    assert real.image_processor.size == {"height": 448, "width": 448}
    assert (real.image_seq_length, real.sam_image_size, real.gt_mask_size) == (256, 1024, 256)
    assert real.image_processor.crop_to_patches and real.image_processor.max_patches == 6


def test_image_prompt_equals_the_tokenized_chat_text(processor, tiny_tokenizer, shapes):
    image, _ = shapes
    inputs = processor(images=image, text=PROMPT)
    expected = f"<|im_start|>user\n{IMAGE_BLOCK}\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert inputs["input_ids"][0].tolist() == tokens(tiny_tokenizer, expected)
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert inputs["sam_pixel_values"].shape == (1, 3, 128, 128)
    assert inputs["original_sizes"].tolist() == [[128, 192]]


def test_text_token_mask_covers_exactly_the_prompt_tokens(processor, tiny_tokenizer, shapes):
    image, _ = shapes
    inputs = processor(images=image, text=PROMPT)
    prefix = (
        len(tokens(tiny_tokenizer, "<|im_start|>user\n"))
        + TINY_IMAGE_SEQ_LENGTH
        + 2
        + len(tokens(tiny_tokenizer, "\n"))
    )
    prompt_length = len(tokens(tiny_tokenizer, PROMPT))
    expected = torch.zeros_like(inputs["text_token_mask"])
    expected[0, prefix : prefix + prompt_length] = True
    assert torch.equal(inputs["text_token_mask"], expected)
    assert tiny_tokenizer.decode(inputs["input_ids"][inputs["text_token_mask"]]) == PROMPT


def test_batched_prompts_are_left_padded(processor, shapes):
    image, _ = shapes
    inputs = processor(images=[image, image], text=["the red circle", PROMPT])
    short, long = inputs["attention_mask"].sum(dim=1).tolist()
    pad = long - short
    assert pad > 0
    assert inputs["attention_mask"][0, :pad].sum() == 0 and inputs["attention_mask"][0, pad:].all()
    assert (inputs["input_ids"][0, :pad] == processor.tokenizer.pad_token_id).all()
    assert not inputs["text_token_mask"][0, :pad].any()
    assert torch.equal(inputs["input_ids"][0, pad:], processor(images=image, text="the red circle")["input_ids"][0])
    assert inputs["sam_pixel_values"].shape == (2, 3, 128, 128)


def test_sam_pixel_values_are_a_plain_resize_with_imagenet_normalisation(processor, shapes):
    image, _ = shapes
    sam = processor(images=image, text=PROMPT)["sam_pixel_values"][0]
    resized = np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(sam.permute(1, 2, 0).numpy(), expected, atol=1e-5)


# -- training mode ---------------------------------------------------------------------------------------------------


def test_labels_are_set_exactly_on_the_answer_and_its_end_token(processor, tiny_tokenizer, shapes):
    image, masks = shapes
    answer = "It is [SEG] and [SEG]."
    features = processor(images=image, text=PROMPT, answer=answer, masks=[masks["red circle"], masks["blue square"]])
    ids, labels = features["input_ids"][0], features["labels"][0]
    answer_ids = tokens(tiny_tokenizer, answer) + [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompt_length = ids.shape[0] - len(answer_ids)
    assert (labels[:prompt_length] == -100).all()
    assert labels[prompt_length:].tolist() == answer_ids == ids[prompt_length:].tolist()
    full = f"<|im_start|>user\n{IMAGE_BLOCK}\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
    assert ids.tolist() == tokens(tiny_tokenizer, full)
    # the text mask stays on the prompt, never on the answer
    assert tiny_tokenizer.decode(ids[features["text_token_mask"][0]]) == PROMPT
    assert features["target_seg_index"].tolist() == [0, 1]
    assert features["target_frame_index"].tolist() == [0, 0]
    assert features["frame_sample_index"].tolist() == [0]
    assert features["seg_object_ids"].tolist() == [0, 1]


def test_gt_masks_are_resized_with_nearest_to_the_low_resolution_size(processor, shapes):
    image, masks = shapes
    features = processor(images=image, text=PROMPT, masks=[masks["green triangle"]])
    expected = F.interpolate(
        torch.from_numpy(masks["green triangle"]).float()[None, None], size=(32, 32), mode="nearest"
    )
    assert features["gt_masks"].shape == (1, 32, 32)
    assert features["gt_masks"].dtype == torch.float32
    assert torch.equal(features["gt_masks"], expected[0])
    # hand check: a 4x6 image whose right half is foreground keeps the right half at 32x32
    half = np.zeros((4, 6), dtype=bool)
    half[:, 3:] = True
    small = processor(images=np.zeros((4, 6, 3), np.uint8), text=PROMPT, masks=[half])["gt_masks"][0]
    assert small[:, :16].sum() == 0 and small[:, 16:].all()


def test_area_resize_stores_the_covered_share_of_each_cell(tiny_tokenizer, shapes):
    """`gt_mask_resize="area"`: each 32×32 target is the mean of its 4×6 footprint of the 128×192 mask (an
    independent block average in numpy)."""
    image, masks = shapes
    area = MaskCMAProcessor.from_model_config(tiny_config(), tiny_tokenizer, gt_mask_resize="area")
    mask = masks["green triangle"]
    gt = area(images=image, text=PROMPT, masks=[mask])["gt_masks"][0]
    expected = mask.astype(np.float64).reshape(32, 4, 32, 6).mean(axis=(1, 3))
    assert gt.dtype == torch.float32
    assert np.allclose(gt.numpy(), expected, atol=1e-6)
    assert ((gt > 0) & (gt < 1)).any()  # soft along the border


def _disk_and_square(size=128):
    centres = np.arange(size) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    disk = (x - 64.0) ** 2 + (y - 61.0) ** 2 < 22.5**2
    square = (x > 40) & (x < 85) & (y > 41) & (y < 86)
    return {"disk": disk, "square": square}


@pytest.mark.parametrize("name", ["disk", "square"])
def test_nearest_targets_are_shifted_and_area_targets_are_not(name):
    """Ideal logits for each target (logit of the target value), upsampled like inference does: the nearest
    targets lose IoU to their half-cell offset (the number docs/training.md quotes), the area targets do not."""
    from transformers_maskcma.processing.training_features import resize_masks

    mask = _disk_and_square()[name]
    ious = {}
    for mode in ("nearest", "area"):
        target = resize_masks([mask], 32, mode)
        ideal_logits = torch.logit(target.clamp(1e-3, 1 - 1e-3))[None]
        predicted = (upsample_mask_logits(ideal_logits, (128, 128))[0, 0] > 0).numpy()
        ious[mode] = (predicted & mask).sum() / (predicted | mask).sum()
    assert ious["nearest"] < 0.89
    assert ious["area"] > 0.98
    # the nearest target is the area one moved by the offset: the mask's first pixel of each 4x4 footprint
    assert torch.equal(resize_masks([mask], 32, "nearest")[0], torch.from_numpy(mask[::4, ::4].astype(np.float32)))


def test_an_unknown_gt_mask_resize_is_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"gt_mask_resize='bilinear' is not valid; use one of \['nearest', 'area'\]"):
        MaskCMAProcessor.from_model_config(tiny_config(), tiny_tokenizer, gt_mask_resize="bilinear")


@pytest.mark.parametrize(
    ("num_objects", "expected"),
    [
        (0, "There is no such object in the image."),
        (1, "Sure, [SEG]."),
        (2, "Sure, [SEG] and [SEG]."),
        (3, "Sure, [SEG], [SEG] and [SEG]."),
    ],
)
def test_an_empty_answer_uses_the_default_template(processor, tiny_tokenizer, shapes, num_objects, expected):
    image, masks = shapes
    object_masks = list(masks.values())[:num_objects]
    assert default_answer(num_objects) == expected
    features = processor(images=image, text=PROMPT, answer="", masks=object_masks)
    answer_positions = features["labels"][0] != -100
    assert tiny_tokenizer.decode(features["labels"][0][answer_positions]) == expected + "<|im_end|>"
    assert features["gt_masks"].shape[0] == num_objects == int((features["input_ids"] == TINY_SEG_TOKEN_ID).sum())


def test_repeated_objects_share_an_object_id(processor, shapes):
    image, masks = shapes
    features = processor(
        images=image, text=PROMPT, masks=[masks["red circle"], masks["blue square"], masks["red circle"]]
    )
    assert features["seg_object_ids"].tolist() == [0, 1, 0]


def moving_square_video(num_frames=6, height=40, width=60):
    """Frames with a white square moving right; object 0 = the square, object 1 = a bar visible from frame 3."""
    frames, square, bar = [], [], []
    for t in range(num_frames):
        frame = np.full((height, width, 3), 90, np.uint8)
        mask = np.zeros((height, width), bool)
        mask[10:20, 5 + 6 * t : 15 + 6 * t] = True
        frame[mask] = 255
        bar_mask = np.zeros((height, width), bool)
        if t >= 3:
            bar_mask[30:36, :] = True
            frame[bar_mask] = (200, 30, 30)
        frames.append(frame)
        square.append(mask)
        bar.append(bar_mask)
    return frames, square, bar


def test_video_training_targets_are_object_major_over_the_key_frames(processor, tiny_tokenizer):
    frames, square, bar = moving_square_video()
    features = processor(
        videos=frames,
        text="the square that moves right",
        masks=[square, bar],
        num_key_frames=3,
        key_frame_sampling="uniform",
    )
    assert features["key_frame_indices"].tolist() == [0, 3, 5]  # linspace(0, 5, 3) = [0, 2.5, 5], halves up
    assert features["pixel_values"].shape == (3, 3, 64, 64)
    assert features["sam_pixel_values"].shape == (3, 3, 128, 128)
    assert features["frame_sample_index"].tolist() == [0, 0, 0]
    assert features["target_seg_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert features["target_frame_index"].tolist() == [0, 1, 2, 0, 1, 2]
    expected = [square[0], square[3], square[5], bar[0], bar[3], bar[5]]
    resized = F.interpolate(torch.from_numpy(np.stack(expected)).float()[:, None], size=(32, 32), mode="nearest")[:, 0]
    assert torch.equal(features["gt_masks"], resized)
    assert features["gt_masks"][3].sum() == 0 and features["gt_masks"][4].sum() > 0  # the bar appears at frame 3
    text = tiny_tokenizer.decode(features["input_ids"][0])
    assert text.count("<img>") == 3 and "Frame1: <img>" in text and "Frame3: <img>" in text
    assert text.endswith("Sure, [SEG] and [SEG].<|im_end|>")
    everything = processor(videos=frames, text="the square", masks=[square], train_frames="all")
    assert everything["sam_pixel_values"].shape[0] == 6 and everything["target_frame_index"].tolist() == list(range(6))


def test_prepare_record_decodes_the_rle_masks(processor, shapes):
    image, masks = shapes
    record = {
        "sample_id": "unit/0",
        "media_type": "image",
        "frames": [image],
        "prompt": PROMPT,
        "answer": "",
        "masks": [[encode_rle(masks["red circle"])]],
    }
    from_record = processor.prepare_record(record)
    direct = processor(images=image, text=PROMPT, masks=[masks["red circle"]])
    for key in direct:
        assert torch.equal(from_record[key], direct[key]), key
    frames, square, _ = moving_square_video(num_frames=4)
    video_record = {
        "sample_id": "unit/1",
        "media_type": "video",
        "frames": [Image.fromarray(f) for f in frames],
        "prompt": "the square",
        "answer": "Sure, [SEG].",
        "masks": [[encode_rle(m) for m in square]],
    }
    features = processor.prepare_record(video_record)
    assert features["gt_masks"].shape == (4, 32, 32)
    bad = dict(record, masks=[[encode_rle(np.zeros((10, 10), bool))]])
    with pytest.raises(ValueError, match=r"unit/0.*masks\[0\]\[0\].*\(10, 10\).*\(128, 192\)"):
        processor.prepare_record(bad)


# -- post-processing -------------------------------------------------------------------------------------------------


def test_post_process_masks_matches_the_model_upsampling(processor):
    generator = torch.Generator().manual_seed(0)
    image_logits = torch.randn(2, 32, 32, generator=generator)
    video_logits = torch.randn(1, 3, 32, 32, generator=generator)
    out = processor.post_process_masks([image_logits, video_logits], torch.tensor([[50, 70], [20, 30]]), threshold=0.3)
    assert out[0].dtype == torch.bool and out[0].shape == (2, 50, 70) and out[1].shape == (1, 3, 20, 30)
    assert torch.equal(out[0], upsample_mask_logits(image_logits, (50, 70)) > 0.3)
    assert torch.equal(out[1], upsample_mask_logits(video_logits, (20, 30)) > 0.3)
    constant = processor.post_process_masks(torch.full((1, 4, 4), 2.0), [[8, 8]])[0]
    assert constant.all()
    with pytest.raises(ValueError, match="2 samples of mask logits but 1 original sizes"):
        processor.post_process_masks([image_logits, video_logits], [[5, 5]])


# -- save / load -----------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(processor, tmp_path, shapes):
    image, masks = shapes
    processor.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_maskcma.MaskCMAProcessor"
    for name in ("processing_maskcma.py", "image_io.py", "video_io.py", "training_features.py", "chat_template.jinja"):
        assert (tmp_path / "a" / name).is_file(), name
    loaded = AutoProcessor.from_pretrained(tmp_path / "a")
    assert type(loaded) is MaskCMAProcessor
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "processor_config.json").read_text() == (
        tmp_path / "b" / "processor_config.json"
    ).read_text()
    assert loaded.chat_template == processor.chat_template
    before = processor(images=image, text=PROMPT, masks=[masks["red circle"]])
    after = loaded(images=image, text=PROMPT, masks=[masks["red circle"]])
    for key in before:
        assert torch.equal(before[key], after[key]), key


# Loading as remote code in a fresh process without the package (AutoProcessor, AutoModel, pipeline) is checked in
# one subprocess by tests/test_pipeline.py::test_remote_code_processor_model_and_pipeline_in_a_fresh_process.


# -- bad input -------------------------------------------------------------------------------------------------------


def test_answer_and_masks_must_agree_in_count(processor, shapes):
    image, masks = shapes
    with pytest.raises(ValueError, match=r"has 2 \[SEG\] token\(s\) but 1 object mask\(s\)"):
        processor(images=image, text=PROMPT, answer="[SEG] and [SEG]", masks=[masks["red circle"]])
    with pytest.raises(ValueError, match=r"has 1 \[SEG\] token\(s\) but 0 object mask\(s\)"):
        processor(images=image, text=PROMPT, answer="Sure, [SEG].")


def test_a_mask_of_the_wrong_size_names_the_expected_size(processor, shapes):
    image, _ = shapes
    with pytest.raises(ValueError, match=r"masks\[0\] has size \(64, 64\).*original size \(128, 192\)"):
        processor(images=image, text=PROMPT, masks=[np.ones((64, 64), bool)])
    frames, square, _ = moving_square_video(num_frames=4)
    with pytest.raises(ValueError, match=r"masks\[0\]\[2\] has size \(5, 5\).*\(40, 60\)"):
        processor(videos=frames, text="x", masks=[[square[0], square[1], np.zeros((5, 5)), square[3]]])
    with pytest.raises(ValueError, match=r"masks\[0\] has 3 frame masks but the video has 4 frames"):
        processor(videos=frames, text="x", masks=[square[:3]])


def test_mismatched_prompts_and_images(processor, shapes):
    image, _ = shapes
    with pytest.raises(ValueError, match=r"got 2 image\(s\) but 1 prompt\(s\)"):
        processor(images=[image, image], text=[PROMPT])
    with pytest.raises(ValueError, match=r"got 2 prompts for one video"):
        processor(videos=[image, image], text=[PROMPT, PROMPT])


def test_unreadable_images_are_named(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png.*corrupt"):
        processor(images=str(broken), text=PROMPT)
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg.*does not exist"):
        processor(images=str(tmp_path / "missing.jpg"), text=PROMPT)
    with pytest.raises(ValueError, match=r"images\[0\].*shape \(3, 8, 8\).*channels last"):
        processor(images=np.zeros((3, 8, 8), np.uint8), text=PROMPT)


def test_a_prompt_longer_than_the_model_accepts_is_rejected(processor, shapes):
    image, _ = shapes
    long_prompt = "the red circle " * 400
    with pytest.raises(ValueError, match=r"text\[0\].*tokens long.*maximum of 1024 tokens"):
        processor(images=image, text=long_prompt)


def test_prompts_cannot_hold_special_tokens(processor, shapes):
    image, _ = shapes
    with pytest.raises(ValueError, match=r"contains the special token '\[SEG\]'"):
        processor(images=image, text="segment [SEG]")
    with pytest.raises(ValueError, match="non-empty string"):
        processor(images=image, text="  ")
