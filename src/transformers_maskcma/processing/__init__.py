"""Processing: the MaskCMA processor (tokenizer + VLM image processor + SAM2 resize + chat layout), image and video
inputs (PyAV decoding, lazy frame sources), the `referring-segmentation` pipeline and the `maskcma predict` command.

Importing this package registers the processor with `AutoProcessor` and the pipeline task with transformers
(`register()`, idempotent). The modules `processing_maskcma`, `image_io`, `video_io`, `training_features` and
`pipeline` are remote-code safe (copied flat into saved folders); the others need the package.
"""

from .image_io import IMAGENET_MEAN, IMAGENET_STD, load_image, sam2_preprocess
from .pipeline import PIPELINE_TASK, ReferringSegmentationPipeline
from .processing_maskcma import MaskCMAProcessor
from .registration import (
    add_pipeline_to_config,
    custom_pipeline_entry,
    register,
    register_pipeline,
    save_model_folder,
    save_pipeline_code,
)
from .training_features import default_answer
from .video_io import (
    FolderFrameSource,
    FrameSource,
    ImageListFrameSource,
    PyAVFrameSource,
    Sam2FrameSource,
    open_video,
    sample_key_frames,
)

register()

__all__ = [
    "FolderFrameSource",
    "FrameSource",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageListFrameSource",
    "MaskCMAProcessor",
    "PIPELINE_TASK",
    "PyAVFrameSource",
    "ReferringSegmentationPipeline",
    "Sam2FrameSource",
    "add_pipeline_to_config",
    "custom_pipeline_entry",
    "default_answer",
    "load_image",
    "open_video",
    "register",
    "register_pipeline",
    "sam2_preprocess",
    "sample_key_frames",
    "save_model_folder",
    "save_pipeline_code",
]
