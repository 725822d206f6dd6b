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
from sa2va_reference import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    bfloat16_round,
    gradient_image,
    internvl_grid,
    internvl_tiles,
    sam2_reference,
)

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


# -- Sa2VA's conventions (the settings `maskcma convert sa2va` saves) --------------------------------------------------
# The references (tests/sa2va_reference.py) are written from Sa2VA's documented behaviour with PIL / numpy.


@pytest.fixture(scope="module")
def sa2va_processor(tiny_tokenizer):
    from transformers_maskcma.hub_cards.convert_sa2va import sa2va_processor_settings

    return build_tiny_processor(tiny_tokenizer, **sa2va_processor_settings(128))


def test_sa2va_tile_counts_of_a_2_to_1_and_a_4_to_3_image(tiny_tokenizer):
    from transformers_maskcma.hub_cards.convert_sa2va import sa2va_processor_settings

    settings = sa2va_processor_settings(1024)
    real = MaskCMAProcessor.from_model_config(MaskCMAConfig(), tiny_tokenizer, **settings)
    cases = {
        (896, 448): 2 + 1,  # 2:1, grid 2×1 (the 4×2 grid ties but is more than twice the image) + thumbnail
        (1792, 896): 8 + 1,  # 2:1 large enough for the 4×2 grid + thumbnail
        (800, 600): 12 + 1,  # 4:3 → 4×3 grid + thumbnail
        (448, 448): 1,  # one tile, no thumbnail
    }
    for (width, height), count in cases.items():
        columns, rows = internvl_grid(width, height, 448, 12)
        assert columns * rows + (columns * rows > 1) == count, (width, height)
        inputs = real(images=Image.new("RGB", (width, height), (90, 120, 200)), text=PROMPT)
        assert inputs["pixel_values"].shape == (count, 3, 448, 448), (width, height)
        assert (inputs["input_ids"] == real.image_token_id).sum() == 256 * count


def test_sa2va_tiles_equal_internvl_tiling_pixel_for_pixel(sa2va_processor):
    for size in ((130, 61), (90, 70), (64, 64), (40, 150)):
        image = gradient_image(*size, seed=size[0])
        got = sa2va_processor(images=image, text=PROMPT)["pixel_values"].numpy()
        expected = internvl_tiles(image, 64, 12)
        assert got.shape == expected.shape, size
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sa2va_sam_input_is_a_bicubic_resize_normalised_in_bfloat16(sa2va_processor, processor):
    """Sa2VA's SAM2 input, bit for bit: images normalised in bfloat16 (mean and std rounded to bfloat16), video
    frames in float32 rounded to bfloat16, both after PIL's default (bicubic) resize."""
    assert bfloat16_round(IMAGENET_MEAN).tolist() == [0.484375, 0.455078125, 0.40625]
    assert bfloat16_round(IMAGENET_STD).tolist() == [0.228515625, 0.2236328125, 0.224609375]
    image = gradient_image(150, 90)
    got = sa2va_processor(images=image, text=PROMPT)["sam_pixel_values"][0].numpy()
    np.testing.assert_array_equal(got, sam2_reference(image, 128))
    # every frame of a video, key frame or not
    frames = [gradient_image(150, 90, seed=seed) for seed in range(7)]
    video = sa2va_processor(videos=frames, text=PROMPT)
    assert video["key_frame_indices"].tolist() == [0, 1, 2, 3, 4]
    for index in (0, 6):
        np.testing.assert_array_equal(video["video_frames"][index].numpy(), sam2_reference(frames[index], 128, True))
    # the two Sa2VA paths differ from each other, and our own models keep a bilinear resize in float32
    assert np.abs(sam2_reference(frames[0], 128) - sam2_reference(frames[0], 128, video=True)).max() > 0
    ours = processor(images=image, text=PROMPT)["sam_pixel_values"][0].numpy()
    pixels = np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    np.testing.assert_allclose(ours, ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), atol=1e-5)
    assert np.abs(ours - got).max() > 0.1


def test_sa2va_key_frames_are_joined_without_labels(sa2va_processor, tiny_tokenizer):
    frames = [gradient_image(80, 60, seed=seed) for seed in range(7)]
    inputs = sa2va_processor(videos=frames, text=PROMPT)
    blocks = "\n".join([IMAGE_BLOCK] * 5)  # one 64-px tile a key frame, no "FrameK: " labels
    expected = f"<|im_start|>user\n{blocks}\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert inputs["input_ids"][0].tolist() == tiny_tokenizer(expected, add_special_tokens=False).input_ids
    assert inputs["pixel_values"].shape == (5, 3, 64, 64)
    reference = np.stack([internvl_tiles(frame, 64, 1)[0] for frame in frames[:5]])
    np.testing.assert_allclose(inputs["pixel_values"].numpy(), reference, atol=1e-5)
    assert tiny_tokenizer.decode(inputs["input_ids"][inputs["text_token_mask"]]) == PROMPT


def test_image_placeholder_places_the_image_blocks(sa2va_processor, tiny_tokenizer, shapes):
    image, _ = shapes  # 192×128: a 3×2 grid + thumbnail = 7 tiles
    blocks = "<img>" + "<IMG_CONTEXT>" * (TINY_IMAGE_SEQ_LENGTH * 7) + "</img>"
    inputs = sa2va_processor(images=image, text="<image>Please segment the red circle.")
    expected = f"<|im_start|>user\n{blocks}Please segment the red circle.<|im_end|>\n<|im_start|>assistant\n"
    assert inputs["input_ids"][0].tolist() == tiny_tokenizer(expected, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(inputs["input_ids"][inputs["text_token_mask"]]) == "Please segment the red circle."
    # text before and after the placeholder both count as the prompt's text
    inputs = sa2va_processor(images=image, text="Look: <image> the red circle")
    assert tiny_tokenizer.decode(inputs["input_ids"][inputs["text_token_mask"]]) == "Look:  the red circle"
    # a prompt without the placeholder keeps the standard layout, Sa2VA's "<image>\n{prompt}"
    plain = sa2va_processor(images=image, text=PROMPT)["input_ids"]
    with_newline = sa2va_processor(images=image, text=f"<image>\n{PROMPT}")["input_ids"]
    assert torch.equal(plain, with_newline)
    with pytest.raises(ValueError, match="placeholder '<image>' 2 times"):
        sa2va_processor(images=image, text="<image> and <image>")


def test_post_process_masks_through_the_intermediate_size(sa2va_processor, processor):
    logits = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1))
    square = F.interpolate(logits[:, None], size=(128, 128), mode="bilinear", align_corners=False)
    expected = F.interpolate(square, size=(50, 70), mode="bilinear", align_corners=False)[:, 0].sigmoid() > 0.5
    got = sa2va_processor.post_process_masks(logits, [[50, 70]])[0]
    assert torch.equal(got, expected)
    assert torch.equal(got, upsample_mask_logits(logits, (50, 70), 128) > 0)  # the model's computation
    assert not torch.equal(processor.post_process_masks(logits, [[50, 70]])[0], got)  # one step differs


def test_sa2va_settings_survive_save_and_load(sa2va_processor, tmp_path):
    sa2va_processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["video_frame_labels"] is False and saved["image_placeholder"] == "<image>"
    assert saved["sam_resample"] == "bicubic" and saved["mask_intermediate_size"] == 128
    assert saved["sam_normalization"] == "sa2va_bfloat16"
    loaded = AutoProcessor.from_pretrained(tmp_path)
    for name in ("video_frame_labels", "image_placeholder", "sam_resample", "sam_normalization",
                 "mask_intermediate_size", "sam_image_mean", "sam_image_std", "chat_template"):  # fmt: skip
        assert getattr(loaded, name) == getattr(sa2va_processor, name), name
    assert loaded.image_processor.crop_to_patches and loaded.image_processor.max_patches == 12


def test_invalid_sa2va_settings_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"sam_resample='nearest' is not valid; use one of \['bilinear', 'bicubic'\]"):
        build_tiny_processor(tiny_tokenizer, sam_resample="nearest")
    with pytest.raises(ValueError, match=r"sam_normalization='bf16' is not valid; use one of \['float32', 'sa2va_bf"):
        build_tiny_processor(tiny_tokenizer, sam_normalization="bf16")
    with pytest.raises(ValueError, match="image_placeholder='' must be a non-empty string"):
        build_tiny_processor(tiny_tokenizer, image_placeholder="")
    with pytest.raises(ValueError, match="mask_intermediate_size=0 must be a positive integer"):
        build_tiny_processor(tiny_tokenizer, mask_intermediate_size=0)
