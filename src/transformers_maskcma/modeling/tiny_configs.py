"""Sizes of the embedded tiny default: a small InternVL-style VLM and a small SAM2 with random weights.

They keep the real architecture (InternVL vision tower + pixel shuffle + Qwen2 LLM; Hiera + FPN + SAM2 decoder
and memory) at toy widths so that a forward and backward pass takes well under a second on two CPU cores.
The vocabulary ids below are the ones the deterministic tiny tokenizer (`transformers_maskcma.processing`)
assigns to its special tokens.
"""

from __future__ import annotations

from transformers import InternVLConfig, Sam2VideoConfig

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
