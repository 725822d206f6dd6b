"""The image-side calls that benchmarks 1 (CMA overhead) and 5 (research path) time: SAM2's image encoder and the
decoding of one object, with and without the CMA, and the original research code's flow that re-encodes the
image before the second decoder pass.

All calls run under `torch.inference_mode()` on a model from `benchmarks.sam2_sizes.build_sam2_bench_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.modeling.mask_decoding import SamFrameFeatures
from transformers_maskcma.modeling.mask_prior import logits_at_embedding
from transformers_maskcma.tiny import tiny_config

from .common import BenchSettings
from .sam2_sizes import build_sam2_bench_model, sam2_config_for, sam2_input_size

DEFAULT_NUM_TEXT_TOKENS = 16  # a referring prompt of a dozen words


@dataclass
class ImageInputs:
    """Inputs for decoding `num_objects` objects on one image.

    Args:
        sam_pixel_values: `(1, 3, S, S)`; seg_embeds: `(num_objects, 256)`;
        text_tokens: `(num_objects, num_text_tokens, 256)`; text_token_mask: `(num_objects, num_text_tokens)` bool.
    """

    sam_pixel_values: torch.Tensor
    seg_embeds: torch.Tensor
    text_tokens: torch.Tensor
    text_token_mask: torch.Tensor

    @property
    def num_objects(self) -> int:
        return self.seg_embeds.shape[0]


def make_image_inputs(
    size: str,
    num_objects: int = 1,
    num_text_tokens: int = DEFAULT_NUM_TEXT_TOKENS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageInputs:
    """Random inputs of the right shapes (the cost of every call below does not depend on the values)."""
    side = sam2_input_size(size)
    if device == "meta" or (isinstance(device, torch.device) and device.type == "meta"):
        def draw(*shape):
            return torch.empty(*shape, device="meta", dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(seed)

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return ImageInputs(
        sam_pixel_values=draw(1, 3, side, side),
        seg_embeds=draw(num_objects, 256),
        text_tokens=draw(num_objects, num_text_tokens, 256),
        text_token_mask=torch.ones(num_objects, num_text_tokens, dtype=torch.bool, device=device),
    )


def per_object(features: SamFrameFeatures, num_objects: int) -> SamFrameFeatures:
    """The image's features repeated once per object (what `segment()` does with `select`)."""
    index = torch.zeros(num_objects, dtype=torch.long, device=features.image_embeddings.device)
    return features.select(index)


def decode(model: MaskCMAModel, features: SamFrameFeatures, inputs: ImageInputs, use_cma: bool) -> dict:
    """`model.decode_masks` with the CMA switched on or off (`use_cma=False` is the one-pass Sa2VA path)."""
    model.config.use_cma = use_cma
    return model.decode_masks(
        per_object(features, inputs.num_objects), inputs.seg_embeds, inputs.text_tokens, inputs.text_token_mask
    )


def image_forward(model: MaskCMAModel, inputs: ImageInputs, use_cma: bool) -> dict:
    """Our path: the image encoder once, then decoding (pass 1 + CMA + pass 2, or one pass without the CMA)."""
    features = model.encode_frames(inputs.sam_pixel_values)
    return decode(model, features, inputs, use_cma)


def reencoding_forward(model: MaskCMAModel, inputs: ImageInputs) -> dict:
    """The original research code's flow, re-implemented: the image is encoded for pass 1 and encoded *again*
    before the CMA and pass 2, instead of re-using the first encoding.

    The prior is brought to the embedding's resolution as `MaskCMAModel.decode_masks` does (`logits_at_embedding`:
    bilinear with anti-aliasing, in float32), so the masks equal those of `image_forward(..., use_cma=True)`: only the cost differs.

    Returns:
        dict with `mask_logits` `(N, 1, 4h, 4w)`, `iou_scores` `(N,)`, `prior_logits` `(N, 1, 4h, 4w)`.
    """
    first = per_object(model.encode_frames(inputs.sam_pixel_values), inputs.num_objects)
    prior_logits = model._decoder_pass(first.image_embeddings, first.high_res_features, inputs.seg_embeds).mask_logits
    second = per_object(model.encode_frames(inputs.sam_pixel_values), inputs.num_objects)
    prior_at_embedding = logits_at_embedding(prior_logits, second.image_embeddings)  # float32, any activation dtype
    refined = model.cma(
        second.image_embeddings, inputs.text_tokens, inputs.text_token_mask, inputs.seg_embeds, prior_at_embedding
    )
    final = model._decoder_pass(refined.image_embeddings, second.high_res_features, inputs.seg_embeds)
    return {"mask_logits": final.mask_logits, "iou_scores": final.iou_scores, "prior_logits": prior_logits}


def memory_warmup(size: str) -> int:
    """Warm-up calls before a peak-memory measurement: one at the tiny size; none at the real sizes, where the
    one-time allocations a first call makes (thread pool, kernel scratch space: a few MiB) vanish next to GiBs of
    activations and a Hiera-L call takes tens of seconds on a CPU core."""
    return 1 if size == "tiny" else 0


def random_features(model: MaskCMAModel, size: str, seed: int, device: str, dtype: torch.dtype) -> SamFrameFeatures:
    """Features of the shapes `encode_frames` returns for `size`, drawn at random (decoder-only measurements)."""
    side = sam2_input_size(size)
    generator = torch.Generator().manual_seed(seed)
    channels = [model.sam2.mask_decoder.conv_s0.out_channels, model.sam2.mask_decoder.conv_s1.out_channels]

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return SamFrameFeatures(
        image_embeddings=draw(1, 256, side // 16, side // 16),
        high_res_features=[draw(1, channels[0], side // 4, side // 4), draw(1, channels[1], side // 8, side // 8)],
    )


# ------------------------------------------------------------------------------------------------------------
# named variants (what the timing loops and the memory probe call)
# ------------------------------------------------------------------------------------------------------------

IMAGE_VARIANTS = ("image_forward_no_cma", "image_forward_cma", "decoder_no_cma", "decoder_cma", "reencoding_cma")


def variant_call(
    variant: str, model: MaskCMAModel, inputs: ImageInputs, features: SamFrameFeatures | None = None
) -> Callable[[], Any]:
    """A zero-argument call of a named variant under `torch.inference_mode()`.

    `decoder_*` variants decode the given precomputed `features`; the others start from the pixels.
    """
    if variant not in IMAGE_VARIANTS:
        raise ValueError(f"unknown image variant {variant!r}; choose one of {list(IMAGE_VARIANTS)}")
    if variant.startswith("decoder") and features is None:
        raise ValueError(f"variant {variant!r} decodes precomputed features: pass `features`")

    def call():
        with torch.inference_mode():
            if variant == "image_forward_no_cma":
                return image_forward(model, inputs, use_cma=False)
            if variant == "image_forward_cma":
                return image_forward(model, inputs, use_cma=True)
            if variant == "decoder_no_cma":
                return decode(model, features, inputs, use_cma=False)
            if variant == "decoder_cma":
                return decode(model, features, inputs, use_cma=True)
            return reencoding_forward(model, inputs)

    return call


def build_image_variant(params: dict[str, Any], settings: BenchSettings) -> Callable[[], Any]:
    """Memory-probe builder: `params = {"size", "variant", "num_objects", "num_text_tokens"}`. Decoder-only variants
    get random features of the right shapes (built before the measurement, so they count in the baseline)."""
    size, variant = params["size"], params["variant"]
    model = build_sam2_bench_model(size, seed=settings.seed, device=settings.device, dtype=settings.weight_dtype)
    inputs = make_image_inputs(
        size,
        num_objects=int(params.get("num_objects", 1)),
        num_text_tokens=int(params.get("num_text_tokens", DEFAULT_NUM_TEXT_TOKENS)),
        seed=settings.seed,
        device=settings.device,
        dtype=settings.weight_dtype,
    )
    features = None
    if variant.startswith("decoder"):
        features = random_features(model, size, settings.seed, settings.device, settings.weight_dtype)
    return variant_call(variant, model, inputs, features)


def count_flops(size: str, variants: tuple[str, ...], num_objects: int = 1, num_text_tokens: int = 16) -> dict:
    """Floating-point operations of each variant, counted by `torch.utils.flop_counter.FlopCounterMode` on the
    meta device (shapes only: exact, instant, and free of the machine's noise). Counts matrix products,
    convolutions and attention, which are all but a negligible part of the work.

    Returns:
        variant → total FLOPs (2 per multiply-add).
    """
    with torch.device("meta"):
        model = MaskCMAModel(tiny_config(sam2_config=sam2_config_for(size))).eval()
    inputs = make_image_inputs(size, num_objects, num_text_tokens, device="meta")
    features = None
    if any(v.startswith("decoder") for v in variants):
        with torch.inference_mode():
            features = model.encode_frames(inputs.sam_pixel_values)
    flops = {}
    for variant in variants:
        call = variant_call(variant, model, inputs, features)
        with FlopCounterMode(display=False) as counter:
            call()
        flops[variant] = int(counter.get_total_flops())
    return flops


def parameter_counts(model: MaskCMAModel) -> dict[str, int]:
    """Parameters of the parts the image path runs."""

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    return {
        "sam2_image_encoder": count(model.sam2.vision_encoder),
        "sam2_prompt_encoder": count(model.sam2.prompt_encoder),
        "sam2_mask_decoder": count(model.sam2.mask_decoder),
        "cma": count(model.cma),
    }
