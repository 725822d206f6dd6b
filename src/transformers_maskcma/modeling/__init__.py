"""The model (copied flat into Hub repositories as remote code)."""

from .cma import MaskGuidedCrossModalAttention, TextTokenRouter, TextToVisualAttention, VisualToTextAttention
from .configuration_maskcma import MaskCMAAttentionConfig, MaskCMAConfig
from .mask_prior import (
    ConvHeadMaskPrior,
    ConvMaskPriorHead,
    GroundTruthMaskPrior,
    MaskPrior,
    MaskPriorOutput,
    PredictedMaskPrior,
    PreviousFrameMaskPrior,
)
from .modeling_maskcma import (
    MaskCMAAnswer,
    MaskCMAModel,
    MaskCMAOutput,
    MaskCMAPreTrainedModel,
    MaskCMASegmentationOutput,
)
from .tmc import TMCOutput, text_mask_contrastive_loss
from .video_segmentation import VideoSegmentationStream

__all__ = [
    "ConvHeadMaskPrior",
    "ConvMaskPriorHead",
    "GroundTruthMaskPrior",
    "MaskCMAAttentionConfig",
    "MaskCMAAnswer",
    "MaskCMAConfig",
    "MaskCMAModel",
    "MaskCMAOutput",
    "MaskCMAPreTrainedModel",
    "MaskCMASegmentationOutput",
    "MaskGuidedCrossModalAttention",
    "MaskPrior",
    "MaskPriorOutput",
    "PredictedMaskPrior",
    "PreviousFrameMaskPrior",
    "TMCOutput",
    "TextToVisualAttention",
    "TextTokenRouter",
    "VideoSegmentationStream",
    "VisualToTextAttention",
    "text_mask_contrastive_loss",
]
