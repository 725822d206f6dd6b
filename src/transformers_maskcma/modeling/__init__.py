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
from .modeling_maskcma import MaskCMAModel, MaskCMAOutput, MaskCMAPreTrainedModel, MaskCMASegmentationOutput

__all__ = [
    "ConvHeadMaskPrior",
    "ConvMaskPriorHead",
    "GroundTruthMaskPrior",
    "MaskCMAAttentionConfig",
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
    "TextToVisualAttention",
    "TextTokenRouter",
    "VisualToTextAttention",
]
