"""GPU check: video segmentation with ``offload_state_to_cpu=True`` keeps SAM2's per-frame state on the CPU while
the model runs on the GPU, and gives the same masks as without offloading.

On a CPU-only machine the model and the state are both on the CPU, so this check could not fail there; it lives
here instead of in the test suite. Run it on a machine with a CUDA GPU, from the repository root:

    python tests/gpu/check_offload_state.py

It prints one line per check and exits 1 when a check fails (or 2 when there is no CUDA GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_video_segmentation import (  # noqa: E402
    KEY_FRAMES,
    NUM_FRAMES,
    object_prompts,
    propagated_logits,
    random_video,
    video_model,
)

from transformers_maskcma.modeling.video_segmentation import VideoMaskPropagation  # noqa: E402

STATE_KEYS = ("pred_masks", "maskmem_features", "maskmem_pos_enc")


def main() -> int:
    if not torch.cuda.is_available():
        print("check_offload_state: needs a CUDA GPU (run it on a GPU machine)", file=sys.stderr)
        return 2
    torch.backends.cudnn.deterministic = True
    model, tokenizer = video_model()
    model = model.to("cuda")
    seg_embeds, text_tokens, text_mask = object_prompts_on(model, tokenizer)
    frames = random_video(NUM_FRAMES)[0].to("cuda")
    failures = []

    def state_devices(options) -> tuple[set[str], torch.Tensor]:
        propagation = VideoMaskPropagation(model, frames, KEY_FRAMES, seg_embeds, text_tokens, text_mask, **options)
        logits = torch.stack([frame.mask_logits for frame in propagation], dim=1)
        devices = {
            entry[key].device.type
            for outputs in propagation.inference_session.output_dict_per_obj.values()
            for entries in outputs.values()
            for entry in entries.values()
            for key in STATE_KEYS
            if key in entry and isinstance(entry[key], torch.Tensor)
        }
        return devices, logits

    offloaded_devices, offloaded = state_devices({"offload_state_to_cpu": True})
    kept_devices, kept = state_devices({})
    checks = [
        ("state tensors found", bool(offloaded_devices) and bool(kept_devices)),
        (f"offloaded state on the CPU only (found {sorted(offloaded_devices)})", offloaded_devices == {"cpu"}),
        (f"state without offloading on the GPU (found {sorted(kept_devices)})", kept_devices == {"cuda"}),
        ("offloaded masks equal (logits > 0)", torch.equal(offloaded > 0, kept > 0)),
        (
            f"offloaded logits close (max difference {float((offloaded - kept).abs().max()):.2e})",
            torch.allclose(offloaded, kept, rtol=1e-4, atol=1e-4),
        ),
        ("masks match the propagation helper", torch.equal(kept > 0, propagated_logits(
            model, frames, seg_embeds, text_tokens, text_mask) > 0)),
    ]  # fmt: skip
    for name, passed in checks:
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
        if not passed:
            failures.append(name)
    return 1 if failures else 0


def object_prompts_on(model, tokenizer):
    """`object_prompts` with the model on the GPU (its inputs are built on the CPU and moved)."""
    original = model.generate_answer

    def on_device(*args, **kwargs):
        args = [a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return original(*args, **kwargs)

    model.generate_answer = on_device
    try:
        return object_prompts(model, tokenizer)
    finally:
        del model.generate_answer


if __name__ == "__main__":
    sys.exit(main())
