"""One VLM pass: `segment()` reads the ``[SEG]`` and prompt-token states from its own `generate` call.

Every state used for the masks is checked against an independent computation, the teacher-forced forward over
prompt + answer (the training computation) with generate's position ids; the answers and masks are checked against
the former two-pass path (kept in `benchmarks/bench_one_pass.py` for the benchmark)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_one_pass import two_pass_generate_answer  # noqa: E402
from transformers_maskcma.modeling.mask_decoding import upsample_mask_logits  # noqa: E402
from transformers_maskcma.modeling.modeling_maskcma import LastHiddenStateRecorder  # noqa: E402
from transformers_maskcma.modeling.modeling_maskcma import forced_answer_generate_kwargs  # noqa: E402
from transformers_maskcma.tiny import (  # noqa: E402
    TINY_IMAGE_SEQ_LENGTH,
    TINY_SAM2_IMAGE_SIZE,
    TINY_SEG_TOKEN_ID,
    TINY_VLM_IMAGE_SIZE,
    build_tiny_model,
    build_tiny_processor,
)

TOLERANCE = 1e-5


def tiny_model(seed: int = 11):
    model, tokenizer = build_tiny_model(seed=seed)
    with torch.no_grad():  # a CMA that changes the masks, so that the text tokens matter
        model.cma.gamma.fill_(1.0)
    return model.eval(), tokenizer


def random_image(height: int, width: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def image_batch(tokenizer, prompts: list[str]) -> dict:
    """Processor inputs for one image per prompt; images of different shapes get different tile counts (up to 4),
    so the prompts differ in length and the batch is left-padded."""
    processor = build_tiny_processor(tokenizer, max_image_tiles=4)
    shapes = [(70, 140), (90, 90), (60, 180)]
    images = [random_image(*shapes[i % len(shapes)], seed=i) for i in range(len(prompts))]
    return dict(processor(images=images, text=prompts))


def texts(tokenizer, answer_ids) -> list[str]:
    """The answers as the processor decodes them (the model returns token ids only)."""
    return build_tiny_processor(tokenizer).decode_answers(answer_ids)


def forced(tokenizer, answers: list[str], prompt_len: int, max_new_tokens: int | None = None) -> dict:
    ids = [tokenizer(answer, add_special_tokens=False).input_ids for answer in answers]
    kwargs = forced_answer_generate_kwargs(ids, prompt_len, tokenizer.eos_token_id)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return kwargs


def vlm_inputs(inputs: dict) -> dict:
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values", "text_token_mask")}


@torch.no_grad()
def teacher_forced_states(model, inputs: dict, answer_ids: list[torch.Tensor]) -> dict:
    """The independent computation: one forward of the VLM over prompt + answer (right-padded answers), with the
    position ids generate uses for left-padded prompts (`cumsum(attention_mask) - 1`), last layer.

    Returns `seg` `(num_seg, H)` at the answers' [SEG] in reading order and `text` (list per row of
    `(num_text_tokens, H)`) at the prompt's text tokens."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt_len = input_ids.shape
    longest = max(len(ids) for ids in answer_ids)
    answers = torch.zeros(batch, longest, dtype=input_ids.dtype)
    answer_mask = torch.zeros(batch, longest, dtype=attention_mask.dtype)
    for row, ids in enumerate(answer_ids):
        answers[row, : len(ids)] = ids
        answer_mask[row, : len(ids)] = 1
    ids = torch.cat([input_ids, answers], dim=1)
    mask = torch.cat([attention_mask, answer_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    outputs = model.vlm(
        input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], position_ids=positions,
        output_hidden_states=True,
    )
    states = outputs.hidden_states[-1]
    seg_rows, seg_columns = (answers == TINY_SEG_TOKEN_ID).logical_and(answer_mask.bool()).nonzero(as_tuple=True)
    text_mask = inputs["text_token_mask"].bool()
    return {
        "seg": states[seg_rows, prompt_len + seg_columns],
        "seg_rows": seg_rows,
        "text": [states[row, :prompt_len][text_mask[row]] for row in range(batch)],
    }


def assert_states_match_teacher_forcing(model, inputs: dict, answer: dict) -> None:
    reference = teacher_forced_states(model, inputs, answer["answer_ids"])
    assert answer["seg_hidden_states"].shape == reference["seg"].shape
    assert torch.equal(answer["seg_sample_index"], reference["seg_rows"])
    torch.testing.assert_close(answer["seg_hidden_states"], reference["seg"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(answer["seg_embeds"], model.seg_proj(reference["seg"]), atol=TOLERANCE, rtol=0)
    for row, expected in enumerate(reference["text"]):
        count = expected.shape[0]
        assert int(answer["text_token_mask"][row].sum()) == count
        assert answer["text_token_mask"][row, :count].all()
        torch.testing.assert_close(answer["text_hidden_states"][row, :count], expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(
            answer["text_tokens"][row, :count], model.text_proj(expected), atol=TOLERANCE, rtol=0
        )



def assert_same_masks(model, masks, other_masks, logits) -> None:
    """Equal masks, except on pixels whose (upsampled) logit lies within the logits' tolerance of the threshold."""
    upsampled = upsample_mask_logits(logits, tuple(masks.shape[-2:]))
    undecided = (upsampled - model.config.mask_threshold).abs() <= 1e-4
    assert torch.equal(masks[~undecided], other_masks[~undecided])


class CallCounter:
    """Counts the forward calls of modules while open (forward hooks)."""

    def __init__(self, **modules):
        self.modules = modules
        self.counts = dict.fromkeys(modules, 0)

    def __enter__(self):
        self.handles = [
            module.register_forward_hook(functools.partial(self._count, name)) for name, module in self.modules.items()
        ]
        return self

    def _count(self, name, *_):
        self.counts[name] += 1

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


def counter(model) -> CallCounter:
    return CallCounter(vision=model.vision_tower(), language=model.vlm.get_decoder())


# -- images -------------------------------------------------------------------------------------------------------


def test_image_states_equal_teacher_forcing_with_several_seg_and_one_vision_pass(tiny_tokenizer):
    model, tokenizer = tiny_model()
    inputs = image_batch(tokenizer, ["Please segment the red circle and the blue square."])
    answer_text = "Sure, [SEG] and [SEG]."
    kwargs = forced(tokenizer, [answer_text], inputs["input_ids"].shape[1])
    with counter(model) as calls, torch.no_grad():
        answer = model.generate_answer(**vlm_inputs(inputs), **kwargs)
    assert texts(tokenizer, answer.answer_ids) == [answer_text]
    new_tokens = answer["answer_ids"][0].numel()  # the answer and its end-of-sequence token
    assert new_tokens == len(tokenizer(answer_text, add_special_tokens=False).input_ids) + 1
    # one vision pass; the language model: the prefill and one step per consumed answer token, nothing more
    assert calls.counts == {"vision": 1, "language": new_tokens}
    assert answer["seg_hidden_states"].shape == (2, model.config.text_hidden_size)
    assert_states_match_teacher_forcing(model, inputs, answer)


def test_left_padded_batch_with_an_early_finished_row_equals_teacher_forcing(tiny_tokenizer):
    model, tokenizer = tiny_model()
    prompts = ["Please segment the red circle.", "Segment every blue square you can find in this picture, please."]
    inputs = image_batch(tokenizer, prompts)
    assert (inputs["attention_mask"] == 0).any(dim=1).tolist().count(True) == 1  # one row is left-padded
    assert inputs["attention_mask"][:, -1].all()
    answers = ["It is [SEG], next to [SEG] and [SEG].", "[SEG]."]  # row 1 ends early; generate pads it
    with torch.no_grad():
        answer = model.generate_answer(**vlm_inputs(inputs), **forced(tokenizer, answers, inputs["input_ids"].shape[1]))
    assert texts(tokenizer, answer.answer_ids) == answers
    assert answer["seg_sample_index"].tolist() == [0, 0, 0, 1]
    assert_states_match_teacher_forcing(model, inputs, answer)


def test_seg_as_the_last_generated_token_takes_one_cached_step(tiny_tokenizer):
    model, tokenizer = tiny_model()
    prompts = ["Segment every blue square you can find in this picture, please.", "Please segment the red circle."]
    inputs = image_batch(tokenizer, prompts)
    last = "It is [SEG]"
    limit = len(tokenizer(last, add_special_tokens=False).input_ids)  # generation stops right after [SEG]
    kwargs = forced(tokenizer, [last, "No."], inputs["input_ids"].shape[1], max_new_tokens=limit)
    with counter(model) as calls, torch.no_grad():
        answer = model.generate_answer(**vlm_inputs(inputs), **kwargs)
    assert texts(tokenizer, answer.answer_ids) == [last, "No."]
    assert answer["answer_ids"][0][-1].item() == TINY_SEG_TOKEN_ID and answer["answer_ids"][0].numel() == limit
    # prefill + (limit - 1) steps + the one extra step over the last [SEG]; the vision tower still runs once
    assert calls.counts == {"vision": 1, "language": limit + 1}
    assert_states_match_teacher_forcing(model, inputs, answer)

    # without the extra step the last [SEG] has no state: a [SEG] that is not last needs none
    inputs_single = image_batch(tokenizer, prompts[:1])
    kwargs = forced(tokenizer, ["It is [SEG] now"], inputs_single["input_ids"].shape[1], max_new_tokens=limit + 1)
    with counter(model) as calls, torch.no_grad():
        answer = model.generate_answer(**vlm_inputs(inputs_single), **kwargs)
    assert answer["answer_ids"][0][-1].item() != TINY_SEG_TOKEN_ID
    assert calls.counts == {"vision": 1, "language": limit + 1}
    assert_states_match_teacher_forcing(model, inputs_single, answer)


def test_segment_answers_and_masks_unchanged_against_the_two_pass_path(tiny_tokenizer, monkeypatch):
    model, tokenizer = tiny_model()
    prompts = ["Please segment the red circle.", "Segment every blue square you can find in this picture, please."]
    inputs = image_batch(tokenizer, prompts)
    answers = ["Sure, [SEG] and [SEG].", "[SEG]."]
    kwargs = forced(tokenizer, answers, inputs["input_ids"].shape[1])
    with counter(model) as calls:
        one_pass = model.segment(**inputs, **kwargs)
    assert calls.counts["vision"] == 1

    monkeypatch.setattr(model, "generate_answer", functools.partial(two_pass_generate_answer, model))
    with counter(model) as calls:
        two_pass = model.segment(**inputs, **kwargs)
    assert calls.counts["vision"] == 2  # the former path ran the vision tower again

    assert texts(tokenizer, one_pass.answer_ids) == texts(tokenizer, two_pass.answer_ids) == answers
    for row in range(len(prompts)):
        assert torch.equal(one_pass.answer_ids[row], two_pass.answer_ids[row])
        torch.testing.assert_close(one_pass.mask_logits[row], two_pass.mask_logits[row], atol=1e-4, rtol=0)
        torch.testing.assert_close(one_pass.scores[row], two_pass.scores[row], atol=1e-5, rtol=0)
        assert_same_masks(model, one_pass.masks[row], two_pass.masks[row], one_pass.mask_logits[row])
    assert [m.shape[0] for m in one_pass.masks] == [2, 1]


def test_recorder_keeps_only_the_last_layer_of_each_call(tiny_tokenizer):
    model, tokenizer = tiny_model()
    inputs = image_batch(tokenizer, ["Please segment the red circle.", "Segment the blue square."])
    kwargs = forced(tokenizer, ["[SEG].", "[SEG]."], inputs["input_ids"].shape[1])
    hidden = model.config.text_hidden_size
    with LastHiddenStateRecorder(model.vlm.get_decoder()) as recorder, torch.no_grad():
        generated = model.vlm.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"], do_sample=False, **kwargs,
        )
    prompt_len = inputs["input_ids"].shape[1]
    shapes = [tuple(chunk.shape) for chunk in recorder.chunks]
    assert shapes == [(2, prompt_len, hidden)] + [(2, 1, hidden)] * (generated.shape[1] - prompt_len - 1)
    assert recorder.states().shape == (2, generated.shape[1] - 1, hidden)


def test_generation_settings_without_per_token_states_are_refused(tiny_tokenizer):
    model, tokenizer = tiny_model()
    inputs = image_batch(tokenizer, ["Please segment the red circle."])
    with pytest.raises(ValueError, match="num_beams=2"):
        model.segment(**inputs, num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        model.segment(**inputs, num_return_sequences=2, do_sample=True, max_new_tokens=3)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model.segment(**inputs, output_hidden_states=True, max_new_tokens=3)


# -- videos -------------------------------------------------------------------------------------------------------


def video_prompt(tokenizer, num_key_frames: int) -> dict:
    block = "<img>" + "<IMG_CONTEXT>" * TINY_IMAGE_SEQ_LENGTH + "</img>"
    frames = "".join(f"Frame{i + 1}: {block}\n" for i in range(num_key_frames))
    text = f"<|im_start|>user\n{frames}Please segment the red circle and the blue square.<|im_end|>\n<|im_start|>assistant\n"
    encoded = tokenizer([text], return_tensors="pt")
    tiles = torch.randn(num_key_frames, 3, TINY_VLM_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    words = tokenizer("Please segment the red circle and the blue square.", add_special_tokens=False).input_ids
    text_token_mask = torch.zeros_like(encoded.input_ids, dtype=torch.bool)
    suffix = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    start = encoded.input_ids.shape[1] - len(suffix) - len(words)
    text_token_mask[0, start : start + len(words)] = True
    assert encoded.input_ids[0, start : start + len(words)].tolist() == words
    return {
        "input_ids": encoded.input_ids,
        "attention_mask": encoded.attention_mask,
        "pixel_values": tiles,
        "text_token_mask": text_token_mask,
    }


def test_video_states_equal_teacher_forcing_and_masks_are_unchanged(tiny_tokenizer, monkeypatch):
    model, tokenizer = tiny_model()
    key_frames = [0, 3, 5]
    inputs = video_prompt(tokenizer, len(key_frames))
    answer_text = "Sure, [SEG] and [SEG]."
    answer_ids = [tokenizer(answer_text, add_special_tokens=False).input_ids]
    with counter(model) as calls, torch.no_grad():
        answer = model.generate_answer(**vlm_inputs(inputs), max_new_tokens=32, answer_ids=answer_ids)
    assert texts(tokenizer, answer.answer_ids) == [answer_text]
    assert calls.counts["vision"] == 1  # the key frames' tiles go through the vision tower once
    assert_states_match_teacher_forcing(model, inputs, answer)

    video = torch.randn(1, 6, 3, TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    arguments = dict(inputs, sam_pixel_values=video, key_frame_indices=key_frames, answer_ids=answer_ids)
    one_pass = model.segment(**arguments)
    monkeypatch.setattr(model, "generate_answer", functools.partial(two_pass_generate_answer, model))
    two_pass = model.segment(**arguments)
    assert texts(tokenizer, one_pass.answer_ids) == texts(tokenizer, two_pass.answer_ids) == [answer_text]
    assert one_pass.masks[0].shape == (2, 6, TINY_SAM2_IMAGE_SIZE, TINY_SAM2_IMAGE_SIZE)
    torch.testing.assert_close(one_pass.mask_logits[0], two_pass.mask_logits[0], atol=1e-4, rtol=0)
    assert_same_masks(model, one_pass.masks[0], two_pass.masks[0], one_pass.mask_logits[0])
