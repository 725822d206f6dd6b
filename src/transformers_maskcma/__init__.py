"""transformers-maskcma: Mask-guided Cross-Modal Attention referring segmentation for Hugging Face transformers.

Importing the package registers the model with the Auto classes (`AutoConfig`, `AutoModel`, `AutoProcessor`) and
the `referring-segmentation` pipeline task, and marks the classes for remote code, so that `save_pretrained` writes an `auto_map` and copies the modeling files beside the weights.
"""

from transformers import AutoConfig, AutoModel

from .modeling import (
    MaskCMAConfig,
    MaskCMAModel,
    MaskCMAOutput,
    MaskCMAPreTrainedModel,
    MaskCMASegmentationOutput,
    MaskGuidedCrossModalAttention,
)

__version__ = "0.1.0"

AutoConfig.register(MaskCMAConfig.model_type, MaskCMAConfig, exist_ok=True)
AutoModel.register(MaskCMAConfig, MaskCMAModel, exist_ok=True)
MaskCMAConfig.register_for_auto_class()
MaskCMAModel.register_for_auto_class("AutoModel")

# the processor module registers itself with AutoProcessor and the `referring-segmentation` pipeline task
from .processing import MaskCMAProcessor, ReferringSegmentationPipeline  # noqa: E402

__all__ = [
    "MaskCMAConfig",
    "MaskCMAModel",
    "MaskCMAOutput",
    "MaskCMAProcessor",
    "MaskCMAPreTrainedModel",
    "MaskCMASegmentationOutput",
    "MaskGuidedCrossModalAttention",
    "ReferringSegmentationPipeline",
    "__version__",
]
