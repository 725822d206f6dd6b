"""The model (copied flat into Hub repositories as remote code)."""

from .cma import ConvMaskPriorHead, MaskGuidedCrossModalAttention, TextTokenRouter
from .configuration_maskcma import MaskCMAConfig
from .modeling_maskcma import MaskCMAModel, MaskCMAOutput, MaskCMAPreTrainedModel, MaskCMASegmentationOutput

__all__ = [
    "ConvMaskPriorHead",
    "MaskCMAConfig",
    "MaskCMAModel",
    "MaskCMAOutput",
    "MaskCMAPreTrainedModel",
    "MaskCMASegmentationOutput",
    "MaskGuidedCrossModalAttention",
    "TextTokenRouter",
]
