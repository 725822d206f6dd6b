"""Configuration of the MaskCMA referring-segmentation model.

This file is copied flat into Hub repositories as remote code: it imports only ``transformers`` (and the standard
library), never the ``transformers_maskcma`` package.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig, Sam2VideoConfig
from transformers.configuration_utils import SubConfigSpec

MASK_SOURCES = ("pred", "conv", "gt")
CMA_DIRECTIONS = ("visual_to_text", "text_to_visual")
CMA_GATES = ("output", "attention")
CMA_WARMUP_TARGETS = ("residual", "mask")
OBJECT_PRESENCE_RULES = ("keep", "blank")


class MaskCMAConfig(PreTrainedConfig):
    r"""
    Configuration of [`MaskCMAModel`]: a multimodal LLM that answers with ``[SEG]`` tokens, SAM2 that turns each
    ``[SEG]`` into a mask, and a Mask-guided Cross-Modal Attention (CMA) module between SAM2's image embedding and
    the prompt's text tokens.

    The defaults reproduce the behaviour of the original research code; the research paper's variants are values
    of the switches below, so that every ablation is a config change.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the image-text-to-text model (any `AutoModelForImageTextToText` architecture).
            Defaults to an InternVL configuration.
        sam2_config (`dict` or `Sam2VideoConfig`, *optional*):
            Configuration of SAM2. One `Sam2VideoModel` serves both the image path (image encoder, prompt encoder,
            mask decoder) and video propagation (memory attention and encoder), so the weights exist once.
        seg_token_id (`int`, *optional*):
            Vocabulary id of the ``[SEG]`` token; set by the processor/tokenizer when the model is built.
        use_cma (`bool`, *optional*, defaults to `True`):
            `False` gives the plain Sa2VA path: one decoder pass, no mask prior, no CMA.
        mask_source (`str`, *optional*, defaults to `"pred"`):
            Where the mask prior G comes from. `"pred"`: a first SAM2 decoder pass (code). `"conv"`: two 1×1
            convolutions over the SAM2 image embedding conditioned on the ``[SEG]`` embedding (paper). `"gt"`:
            the ground-truth mask during training; at inference, where no ground truth exists, `"pred"` is used.
        cma_direction (`str`, *optional*, defaults to `"visual_to_text"`):
            `"visual_to_text"`: queries are image positions, keys/values the routed text tokens (code).
            `"text_to_visual"`: queries are the routed text tokens, keys/values image positions; the attended
            tokens are scattered back to the image through the same attention map (paper).
        cma_topk_tokens (`int` or `None`, *optional*, defaults to 2):
            Number of text tokens the router keeps per object; `None` keeps all of them.
        cma_gate (`str`, *optional*, defaults to `"output"`):
            `"output"`: the attention output is multiplied by ``sigmoid(G)`` (code). `"attention"`: the attention
            probabilities are re-weighted by ``sigmoid(G)`` (paper).
        cma_warmup_target (`str`, *optional*, defaults to `"residual"`):
            `"residual"`: the residual scale γ is multiplied by a warm-up factor going 0 → 1 (code). `"mask"`: the
            gate is warmed up instead, ``gate = 1 + ω (sigmoid(G) − 1)`` with ω going 0 → 1 (paper).
        warmup_ratio (`float`, *optional*, defaults to 0.1):
            Fraction of the training steps over which the warm-up factor goes from 0 to 1.
        cma_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the CMA; must divide SAM2's embedding width (256).
        cma_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the CMA attention probabilities.
        cma_on_propagation (`bool`, *optional*, defaults to `True`):
            Also apply the CMA on video frames produced by SAM2 memory propagation, with the previous frame's mask
            as prior.
        tmc_weight (`float`, *optional*, defaults to 0.1):
            Weight of the symmetric text–mask contrastive (InfoNCE) loss, computed by `MaskCMATrainer`.
        tmc_temperature (`float`, *optional*, defaults to 0.15):
            Temperature τ of the contrastive loss.
        prior_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the BCE + Dice loss on the mask prior (pass 1 or the conv head). 0 trains the prior only
            through the final mask, as the research code did.
        bce_loss_weight (`float`, *optional*, defaults to 2.0):
            Weight of the per-pixel binary cross-entropy on the 256×256 (low-resolution) mask logits.
        dice_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the Dice loss (smoothing 1) on the same logits.
        iou_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of SAM2's IoU-prediction loss: the L1 distance between the IoU head's prediction and the actual
            IoU of each of the three multimask outputs with the ground truth, on targets whose object is present
            (SAM2's training recipe). The IoU head chooses among the multimask outputs and gives `scores`. 0 leaves
            the head frozen (when SAM2 is frozen).
        object_score_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of SAM2's object-score loss: binary cross-entropy between the object-score logit and whether the
            ground truth has a foreground pixel (empty targets, as in MeViS and ReVOS, teach "absent"). 0 leaves the
            head frozen (when SAM2 is frozen).
        object_presence (`str`, *optional*, defaults to `"keep"`):
            What a mask becomes where SAM2's object score says the object is absent (logit <= 0), on every path
            (images, video key frames, propagated frames). `"keep"`: the mask is kept as decoded (Sa2VA's SAM2);
            the score still selects the learned no-object pointer and adds the no-object embedding to the video
            memory. `"blank"`: the mask is replaced by SAM2's no-object logits (-1024, an empty mask), as SAM2
            itself does.
        mask_threshold (`float`, *optional*, defaults to 0.0):
            Logit threshold for a foreground pixel (0.0 ⇔ sigmoid > 0.5).
        freeze_sam2_image_encoder (`bool`, *optional*, defaults to `True`):
            Keep SAM2's image encoder and memory modules frozen (as in Sa2VA training).
        freeze_vision_tower (`bool`, *optional*, defaults to `True`):
            Keep the VLM's vision tower frozen.

    Example:

    ```python
    >>> from transformers_maskcma import MaskCMAConfig, MaskCMAModel
    >>> config = MaskCMAConfig.tiny()
    >>> model = MaskCMAModel(config)
    ```
    """

    model_type: ClassVar[str] = "maskcma"
    sub_configs_defaults: ClassVar[dict] = {
        "vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="internvl"),
        "sam2_config": Sam2VideoConfig,
    }

    vlm_config: dict | PreTrainedConfig | None = None
    sam2_config: dict | PreTrainedConfig | None = None
    seg_token_id: int | None = None
    use_cma: bool = True
    mask_source: str = "pred"
    cma_direction: str = "visual_to_text"
    cma_topk_tokens: int | None = 2
    cma_gate: str = "output"
    cma_warmup_target: str = "residual"
    warmup_ratio: float = 0.1
    cma_num_heads: int = 8
    cma_dropout: float = 0.0
    cma_on_propagation: bool = True
    tmc_weight: float = 0.1
    tmc_temperature: float = 0.15
    prior_loss_weight: float = 0.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    iou_loss_weight: float = 1.0
    object_score_loss_weight: float = 1.0
    object_presence: str = "keep"
    mask_threshold: float = 0.0
    freeze_sam2_image_encoder: bool = True
    freeze_vision_tower: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_switches()

    # -- validation -------------------------------------------------------------------------------------------

    def _validate_switches(self) -> None:
        def check_choice(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"MaskCMAConfig.{field}={value!r} is not valid; allowed values are {list(allowed)}")

        check_choice("mask_source", MASK_SOURCES)
        check_choice("cma_direction", CMA_DIRECTIONS)
        check_choice("cma_gate", CMA_GATES)
        check_choice("cma_warmup_target", CMA_WARMUP_TARGETS)
        check_choice("object_presence", OBJECT_PRESENCE_RULES)

        topk = self.cma_topk_tokens
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(
                f"MaskCMAConfig.cma_topk_tokens={topk!r} is not valid; use an integer >= 1, or None for all text tokens"
            )
        if not 0.0 <= float(self.warmup_ratio) <= 1.0:
            raise ValueError(f"MaskCMAConfig.warmup_ratio={self.warmup_ratio!r} is not valid; it must lie in [0, 1]")
        embed_dim = self.seg_embed_dim
        heads = self.cma_num_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or embed_dim % heads != 0:
            divisors = [d for d in range(1, embed_dim + 1) if embed_dim % d == 0]
            raise ValueError(
                f"MaskCMAConfig.cma_num_heads={heads!r} is not valid; it must divide SAM2's embedding width "
                f"{embed_dim}, e.g. one of {divisors}"
            )
        if not 0.0 <= float(self.cma_dropout) < 1.0:
            raise ValueError(f"MaskCMAConfig.cma_dropout={self.cma_dropout!r} is not valid; it must lie in [0, 1)")
        if float(self.tmc_temperature) <= 0.0:
            raise ValueError(
                f"MaskCMAConfig.tmc_temperature={self.tmc_temperature!r} is not valid; it must be > 0"
            )
        for field in (
            "tmc_weight",
            "prior_loss_weight",
            "bce_loss_weight",
            "dice_loss_weight",
            "iou_loss_weight",
            "object_score_loss_weight",
        ):
            if float(getattr(self, field)) < 0.0:
                raise ValueError(f"MaskCMAConfig.{field}={getattr(self, field)!r} is not valid; it must be >= 0")

    # -- derived sizes -----------------------------------------------------------------------------------------

    @property
    def seg_embed_dim(self) -> int:
        """Width of SAM2's prompt/image embedding (256 in every released SAM2), the width of ``[SEG]`` embeddings."""
        return int(self.sam2_config.mask_decoder_config.hidden_size)

    @property
    def text_hidden_size(self) -> int:
        """Hidden size of the VLM's language model, the input width of ``seg_proj`` and ``text_proj``."""
        text_config = self.vlm_config.get_text_config()
        return int(text_config.hidden_size)

    @property
    def image_token_id(self) -> int:
        """Vocabulary id of the VLM's image placeholder token."""
        return int(getattr(self.vlm_config, "image_token_id", getattr(self.vlm_config, "image_token_index", -1)))

    @classmethod
    def tiny(cls, **overrides) -> MaskCMAConfig:
        """A small random-weight configuration for tests and the demo (see `modeling.tiny`)."""
        from .tiny_configs import tiny_sam2_config, tiny_vlm_config

        fields = {"vlm_config": tiny_vlm_config(), "sam2_config": tiny_sam2_config()}
        fields.update(overrides)
        return cls(**fields)


__all__ = ["MaskCMAConfig"]
