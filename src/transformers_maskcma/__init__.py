"""transformers-maskcma: Mask-guided Cross-Modal Attention referring segmentation for Hugging Face transformers."""

__version__ = "0.1.0"
