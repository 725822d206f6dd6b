"""Configuration of the MaskCMA referring-segmentation model: [`MaskCMAConfig`] and its CMA sub-configuration
[`MaskCMAAttentionConfig`].

This file is copied flat into Hub repositories as remote code: it imports only ``transformers`` (and the standard
library), never the ``transformers_maskcma`` package.
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from transformers import AutoConfig, PreTrainedConfig, Sam2VideoConfig
from transformers.configuration_utils import SubConfigSpec

MaskSource = Literal["pred", "conv", "gt"]
CmaDirection = Literal["visual_to_text", "text_to_visual"]
CmaGate = Literal["output", "attention"]
CmaWarmupTarget = Literal["residual", "mask"]
ObjectPresence = Literal["keep", "blank"]
VideoTraining = Literal["independent", "propagate"]

# flat fields of configs saved before `cma_config` existed → their field in `MaskCMAAttentionConfig`
LEGACY_CMA_FIELDS = {
    "cma_direction": "direction",
    "cma_gate": "gate",
    "cma_warmup_target": "warmup_target",
    "cma_num_heads": "num_heads",
    "cma_dropout": "dropout",
}


def check_choice(config: PreTrainedConfig, field: str, choices: object) -> None:
    """Raise a `ValueError` naming the field, its value and the allowed values when `config.<field>` is not one of
    the values of the `Literal` type `choices`."""
    value = getattr(config, field)
    allowed = list(get_args(choices))
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{field}={value!r} is not valid; allowed values are {allowed}")


class MaskCMAAttentionConfig(PreTrainedConfig):
    r"""
    Configuration of the Mask-guided Cross-Modal Attention ([`VisualToTextAttention`] or [`TextToVisualAttention`]),
    the `cma_config` of [`MaskCMAConfig`]. The attention runs at SAM2's embedding width (256); how many text tokens
    it sees (`cma_topk_tokens`) and where its gate comes from (`mask_source`) are fields of `MaskCMAConfig`.

    Args:
        direction (`str`, *optional*, defaults to `"visual_to_text"`):
            `"visual_to_text"`: queries are image positions, keys/values the routed text tokens (code).
            `"text_to_visual"`: queries are the routed text tokens, keys/values image positions; the attended
            tokens return to the image through the same attention map (paper).
        gate (`str`, *optional*, defaults to `"output"`):
            `"output"`: the projected attention output is multiplied by ``sigmoid(G)`` (code). `"attention"`: the
            attention is re-weighted by ``sigmoid(G)`` (paper): per query position when the queries are visual,
            renormalised over image positions when the keys are visual.
        warmup_target (`str`, *optional*, defaults to `"residual"`):
            `"residual"`: the residual scale γ is multiplied by a warm-up factor going 0 → 1 (code). `"mask"`: the
            gate is warmed up instead, ``gate = 1 + ω (sigmoid(G) − 1)`` with ω going 0 → 1 (paper).
        num_heads (`int`, *optional*, defaults to 8):
            Attention heads; must divide SAM2's embedding width (256).
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities during training.
    """

    model_type: ClassVar[str] = "maskcma_attention"
    base_config_key: ClassVar[str] = "cma_config"

    direction: CmaDirection = "visual_to_text"
    gate: CmaGate = "output"
    warmup_target: CmaWarmupTarget = "residual"
    num_heads: int = 8
    dropout: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_choice(self, "direction", CmaDirection)
        check_choice(self, "gate", CmaGate)
        check_choice(self, "warmup_target", CmaWarmupTarget)
        heads = self.num_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"MaskCMAAttentionConfig.num_heads={heads!r} is not valid; use an integer >= 1")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"MaskCMAAttentionConfig.dropout={self.dropout!r} is not valid; it must lie in [0, 1)")


class MaskCMAConfig(PreTrainedConfig):
    r"""
    Configuration of [`MaskCMAModel`]: a multimodal LLM that answers with ``[SEG]`` tokens, SAM2 that turns each
    ``[SEG]`` into a mask, and a Mask-guided Cross-Modal Attention (CMA) module between SAM2's image embedding and
    the prompt's text tokens.

    The defaults are the research code's variant; the research paper's variants are values of the switches below
    (see docs/cma_ablation.md), so that every ablation is a config change.

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
            Where the mask prior G comes from (a [`MaskPrior`] strategy). `"pred"`: a first SAM2 decoder pass (code).
            `"conv"`: two 1×1 convolutions over the SAM2 image embedding conditioned on the ``[SEG]`` embedding
            (paper). `"gt"`: the ground-truth mask during training; at inference, where no ground truth exists,
            `"pred"` is used. On video frames produced by SAM2 propagation the prior is the previous frame's mask,
            except with `"conv"`.
        cma_config (`dict` or `MaskCMAAttentionConfig`, *optional*):
            The CMA's variant and size: attention direction, gate position, warm-up target, heads, dropout. The flat
            keys of configs saved before this field existed (`cma_direction`, `cma_gate`, `cma_warmup_target`,
            `cma_num_heads`, `cma_dropout`) are still accepted and moved here.
        cma_topk_tokens (`int` or `None`, *optional*, defaults to 2):
            Number of text tokens the router keeps per object; `None` keeps all of them.
        warmup_ratio (`float`, *optional*, defaults to 0.1):
            Fraction of the training steps over which the warm-up factor goes from 0 to 1.
        cma_on_propagation (`bool`, *optional*, defaults to `True`):
            Also apply the CMA on video frames produced by SAM2 memory propagation, with the previous frame's mask
            as prior.
        tmc_weight (`float`, *optional*, defaults to 0.1):
            Weight of the symmetric text–mask contrastive (InfoNCE) loss, computed by `MaskCMATrainer`.
        tmc_temperature (`float`, *optional*, defaults to 0.15):
            Temperature τ of the contrastive loss.
        prior_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the BCE + Dice loss on the mask prior (pass 1 or the conv head). 0 trains the prior only
            through the final mask.
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
        mask_intermediate_size (`int` or `None`, *optional*, defaults to `None`):
            How the low-resolution mask logits reach the image size. `None`: one bilinear upsampling (our models).
            An integer `S`: first bilinearly to `S×S`, then to the image size — Sa2VA's chain (256² → 1024² → image
            size, SAM2's video predictor returning its masks at the input size), which `maskcma convert sa2va`
            sets to SAM2's input size. Used by `segment` on images, key frames and propagated frames.
        video_training (`str`, *optional*, defaults to `"independent"`):
            How training decodes the frames of a video sample. `"independent"`: every frame through the image path,
            from the ``[SEG]`` prompts (the research code). `"propagate"`: a clip of `video_training_clip_frames`
            frames runs as inference does — its key frames decoded from the ``[SEG]`` prompts become SAM2's
            conditioning frames, the other frames come from SAM2's memory (with the CMA when `cma_on_propagation`)
            — with the mask, IoU and object-score losses on every frame, so SAM2's memory attention, memory encoder
            and object pointers are trained (and are not frozen by `freeze_sam2_image_encoder`).
        video_training_clip_frames (`int`, *optional*, defaults to 8):
            Frames of a training clip with `video_training="propagate"` (SAM2 trains its memory on 8-frame clips);
            must exceed the processor's number of key frames for frames to be propagated.
        freeze_sam2_image_encoder (`bool`, *optional*, defaults to `True`):
            Keep SAM2's image encoder and memory modules frozen (as in Sa2VA training).
        freeze_vision_tower (`bool`, *optional*, defaults to `True`):
            Keep the VLM's vision tower frozen.

    Example:

    ```python
    >>> from transformers_maskcma import MaskCMAConfig
    >>> config = MaskCMAConfig(mask_source="conv", cma_config={"direction": "text_to_visual", "gate": "attention"})
    >>> config.cma_config.direction
    'text_to_visual'
    ```
    """

    model_type: ClassVar[str] = "maskcma"
    sub_configs_defaults: ClassVar[dict] = {
        "vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="internvl"),
        "sam2_config": Sam2VideoConfig,
        "cma_config": MaskCMAAttentionConfig,
    }

    vlm_config: dict | PreTrainedConfig | None = None
    sam2_config: dict | PreTrainedConfig | None = None
    seg_token_id: int | None = None
    use_cma: bool = True
    mask_source: MaskSource = "pred"
    cma_config: dict | PreTrainedConfig | None = None
    cma_topk_tokens: int | None = 2
    warmup_ratio: float = 0.1
    cma_on_propagation: bool = True
    tmc_weight: float = 0.1
    tmc_temperature: float = 0.15
    prior_loss_weight: float = 0.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    iou_loss_weight: float = 1.0
    object_score_loss_weight: float = 1.0
    object_presence: ObjectPresence = "keep"
    mask_threshold: float = 0.0
    mask_intermediate_size: int | None = None
    video_training: VideoTraining = "independent"
    video_training_clip_frames: int = 8
    freeze_sam2_image_encoder: bool = True
    freeze_vision_tower: bool = True

    def __post_init__(self, **kwargs):
        legacy = {old: kwargs.pop(old) for old in LEGACY_CMA_FIELDS if old in kwargs}
        if legacy:
            if self.cma_config is not None:
                raise ValueError(
                    f"MaskCMAConfig got both cma_config and the flat fields {sorted(legacy)}; pass the CMA settings "
                    f"once, inside cma_config (as {sorted(LEGACY_CMA_FIELDS[old] for old in legacy)})"
                )
            self.cma_config = {LEGACY_CMA_FIELDS[old]: value for old, value in legacy.items()}
        super().__post_init__(**kwargs)
        self._validate_switches()

    # -- validation -------------------------------------------------------------------------------------------

    def _validate_switches(self) -> None:
        check_choice(self, "mask_source", MaskSource)
        check_choice(self, "object_presence", ObjectPresence)
        check_choice(self, "video_training", VideoTraining)
        clip = self.video_training_clip_frames
        if isinstance(clip, bool) or not isinstance(clip, int) or clip < 2:
            raise ValueError(
                f"MaskCMAConfig.video_training_clip_frames={clip!r} is not valid; use an integer >= 2 (a key frame and "
                "at least one frame propagated from it)"
            )

        topk = self.cma_topk_tokens
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(
                f"MaskCMAConfig.cma_topk_tokens={topk!r} is not valid; use an integer >= 1, or None for all text tokens"
            )
        size = self.mask_intermediate_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(
                f"MaskCMAConfig.mask_intermediate_size={size!r} is not valid; use a positive integer (e.g. SAM2's "
                "input size 1024 for Sa2VA's 256 → 1024 → image-size chain) or None for one upsampling step"
            )
        if not 0.0 <= float(self.warmup_ratio) <= 1.0:
            raise ValueError(f"MaskCMAConfig.warmup_ratio={self.warmup_ratio!r} is not valid; it must lie in [0, 1]")
        embed_dim = self.seg_embed_dim
        heads = self.cma_config.num_heads
        if embed_dim % heads != 0:
            divisors = [d for d in range(1, embed_dim + 1) if embed_dim % d == 0]
            raise ValueError(
                f"MaskCMAAttentionConfig.num_heads={heads!r} is not valid; it must divide SAM2's embedding width "
                f"{embed_dim}, e.g. one of {divisors}"
            )
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


__all__ = ["MaskCMAAttentionConfig", "MaskCMAConfig"]
