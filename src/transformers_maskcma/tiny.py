"""The embedded tiny default, in one place: a complete MaskCMA model with random weights, its tokenizer and its
processor, small enough for CPU tests and demos.

The sizes keep the real architecture (InternVL vision tower + pixel shuffle + Qwen2 LLM; Hiera + FPN + SAM2 decoder
and memory) at toy widths so that a forward and backward pass takes well under a second on two CPU cores. The
tokenizer is a byte-level BPE trained locally and deterministically (no Hub, no network) on a fixed English corpus
of referring prompts and answers; its special tokens get the ids the configs below use.

This module sits above `modeling` and `processing` and imports both; neither imports it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, PreTrainedTokenizerFast, Sam2VideoConfig

from .modeling import MaskCMAConfig, MaskCMAModel
from .processing import MaskCMAProcessor

TINY_VOCAB_SIZE = 640
# special tokens of the tiny tokenizer, in id order
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "[SEG]")
TINY_PAD_TOKEN_ID = 0
TINY_IMAGE_TOKEN_ID = 5
TINY_SEG_TOKEN_ID = 6

TINY_VLM_IMAGE_SIZE = 64  # one 64×64 tile
TINY_VLM_PATCH_SIZE = 8  # 8×8 patches → 16 tokens a tile after the 0.5 pixel shuffle
TINY_IMAGE_SEQ_LENGTH = (TINY_VLM_IMAGE_SIZE // TINY_VLM_PATCH_SIZE) ** 2 // 4
TINY_SAM2_IMAGE_SIZE = 128  # SAM2 input; 8×8 image embedding, 32×32 low-resolution masks


def tiny_vlm_config() -> InternVLConfig:
    """InternVL-style VLM: 1-layer ViT (width 32) and a 2-layer Qwen2 LLM (width 64)."""
    return InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": [TINY_VLM_IMAGE_SIZE, TINY_VLM_IMAGE_SIZE],
            "patch_size": [TINY_VLM_PATCH_SIZE, TINY_VLM_PATCH_SIZE],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": 2,
            "pad_token_id": TINY_PAD_TOKEN_ID,
        },
        image_token_id=TINY_IMAGE_TOKEN_ID,
        image_seq_length=TINY_IMAGE_SEQ_LENGTH,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


def tiny_sam2_config(image_size: int = TINY_SAM2_IMAGE_SIZE) -> Sam2VideoConfig:
    """SAM2 with a 5-block Hiera (widths 16–128), a 1-layer two-way decoder and 1-layer memory attention.
    The prompt/image embedding keeps SAM2's width of 256 so that the CMA runs at its real width."""
    stride16 = image_size // 16
    return Sam2VideoConfig(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "image_size": [image_size, image_size],
                "hidden_size": 16,
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "window_size_per_stage": [4, 4, 4, 4],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[image_size // 4] * 2, [image_size // 8] * 2, [stride16] * 2],
            "fpn_hidden_size": 256,
        },
        prompt_encoder_config={"image_size": image_size, "patch_size": 16, "hidden_size": 256},
        mask_decoder_config={
            "hidden_size": 256,
            "mlp_dim": 256,
            "num_hidden_layers": 1,
            "num_attention_heads": 8,
            "iou_head_hidden_dim": 64,
        },
        image_size=image_size,
        num_maskmem=4,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=256,
        memory_attention_rope_feat_sizes=[stride16, stride16],
        memory_encoder_output_channels=64,
        memory_fuser_num_layers=1,
        memory_fuser_intermediate_dim=256,
    )


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "grey")
_SHAPES = ("circle", "square", "triangle", "shape", "object", "man", "woman", "person", "dog", "cat", "car", "ball")
_PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "in front", "behind")
_MOTIONS = ("moves up", "moves down", "moves left", "moves right", "stays still", "is moving", "runs", "jumps")
_TEMPLATES = (
    "Please segment the {c} {s} {p}.",
    "Can you segment the {s} that {m}?",
    "What is the {c} {s} {p} in this image? Please respond with a segmentation mask.",
    "Segment the {c} {s}.",
    "the {s} {p} that {m}",
    "Sure, it is [SEG].",
    "Sure, [SEG].",
    "It is [SEG] and [SEG].",
    "There is no such object in the image.",
    "<image>\nPlease segment the {c} {s} in the video.",
)


def tiny_corpus() -> list[str]:
    """The fixed training corpus (ordered, so training is deterministic)."""
    lines = []
    for template in _TEMPLATES:
        for colour in _COLOURS:
            for shape in _SHAPES:
                for index, place in enumerate(_PLACES):
                    motion = _MOTIONS[(index + len(shape)) % len(_MOTIONS)]
                    lines.append(template.format(c=colour, s=shape, p=place, m=motion))
    return lines


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE (vocabulary 640; special tokens at ids 0–6, `TINY_SPECIAL_TOKENS`)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(TINY_SPECIAL_TOKENS[1:]),
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    for token_id, token in enumerate(TINY_SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"tiny tokenizer: special token {token!r} did not get id {token_id}")
    return tokenizer


def tiny_config(**overrides) -> MaskCMAConfig:
    """The tiny `MaskCMAConfig` (tiny VLM and SAM2, the tiny tokenizer's ``[SEG]`` id); `overrides` are config
    fields (e.g. `mask_source="conv"`, `cma_config={"direction": "text_to_visual"}`)."""
    fields = {"vlm_config": tiny_vlm_config(), "sam2_config": tiny_sam2_config(), "seg_token_id": TINY_SEG_TOKEN_ID}
    fields.update(overrides)
    return MaskCMAConfig(**fields)


def build_tiny_model(seed: int = 0, **config_overrides) -> tuple[MaskCMAModel, PreTrainedTokenizerFast]:
    """Build the tiny model (random weights from `seed`) and its tokenizer.

    Returns:
        `(model, tokenizer)`; the tokenizer belongs to the processor (`build_tiny_processor`).
    """
    config = tiny_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskCMAModel(config)
    tokenizer = build_tiny_tokenizer()
    model.vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    model.vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None, **kwargs) -> MaskCMAProcessor:
    """The processor of `build_tiny_model()`: 64×64 VLM tiles (16 image tokens a tile), SAM2 input 128×128, training
    masks at 32×32, the tiny tokenizer (built when not given).

    Args:
        tokenizer: the tiny tokenizer (e.g. the one `build_tiny_model()` returned); built when `None`.
        kwargs: further `MaskCMAProcessor.from_model_config` arguments (`num_key_frames`, …).
    """
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    return MaskCMAProcessor.from_model_config(tiny_config(), tokenizer, **kwargs)


__all__ = [
    "TINY_IMAGE_SEQ_LENGTH",
    "TINY_IMAGE_TOKEN_ID",
    "TINY_PAD_TOKEN_ID",
    "TINY_SAM2_IMAGE_SIZE",
    "TINY_SEG_TOKEN_ID",
    "TINY_SPECIAL_TOKENS",
    "TINY_VLM_IMAGE_SIZE",
    "TINY_VOCAB_SIZE",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "tiny_config",
    "tiny_sam2_config",
    "tiny_vlm_config",
]
