"""GPU check: the model split between the GPU and the CPU through `device_map` (the VLM on one, SAM2 and the CMA
on the other, and the reverse) gives the masks of the all-CPU model, for an image batch and for a video.

A single CPU cannot run a split model (the test suite only proves the boundaries with the meta device, in
tests/test_precision.py), so this check lives here. Run it on a machine with a CUDA GPU, from the repository root:

    python tests/gpu/check_split_devices.py

It prints one line per check and exits 1 when a check fails (or 2 when there is no CUDA GPU).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_inputs import make_batch  # noqa: E402
from test_video_segmentation import make_cma_strong, segment, video_model  # noqa: E402

from transformers_maskcma.modeling import MaskCMAModel  # noqa: E402

PLACEMENTS = {
    "vlm-on-gpu": {"vlm": 0, "seg_proj": 0, "text_proj": 0, "cma": "cpu", "sam2": "cpu"},
    "sam2-on-gpu": {"vlm": "cpu", "seg_proj": "cpu", "text_proj": "cpu", "cma": 0, "sam2": 0},
}


def main() -> int:
    if not torch.cuda.is_available():
        print("check_split_devices: no CUDA GPU on this machine; run it where torch.cuda.is_available() is True")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = video_model()
    make_cma_strong(model)
    batch = make_batch(tokenizer, ["Please segment the red circle.", "Segment the square."],
                       ["Sure, [SEG].", "Here: [SEG] and [SEG]."])  # fmt: skip
    batch.pop("labels")
    with torch.no_grad():
        reference_image = model(**batch).pred_masks
    reference_video = segment(model, tokenizer).masks[0]
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name, device_map in PLACEMENTS.items():
            split = MaskCMAModel.from_pretrained(folder, device_map=device_map).eval()
            with torch.no_grad():
                split.sam2.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(20.0)
                image = split(**batch).pred_masks.cpu()
            image_ok = torch.allclose(image, reference_image, atol=1e-3, rtol=1e-3)
            video = segment(split, tokenizer).masks[0].cpu()
            agreement = float((video == reference_video).float().mean())
            video_ok = video.shape == reference_video.shape and agreement >= 0.999
            print(f"{name}: image max|Δlogit| {float((image - reference_image).abs().max()):.2e} "
                  f"{'OK' if image_ok else 'FAIL'}; video mask agreement {agreement:.4f} "
                  f"{'OK' if video_ok else 'FAIL'}")  # fmt: skip
            failures += int(not image_ok) + int(not video_ok)
            del split
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
