"""GPU check: a training step of the tiny model with the predicted mask prior runs under
`torch.use_deterministic_algorithms(True)` (the Trainer's `full_determinism`) on CUDA, under bfloat16 autocast, and
gives bit-identical gradients twice; the plain anti-aliased `F.interpolate`, whose CUDA backward is flagged
nondeterministic, is what the prior no longer uses.

On a CPU the anti-aliased backward is not flagged, so this check could only pass there; run it on a machine with a
CUDA GPU, from the repository root:

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m benchmarks.gpu.check_determinism

It prints one line per check and exits 1 when a check fails (2 without a CUDA GPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "tests"))


def main() -> int:
    if not torch.cuda.is_available():
        print("check_determinism: needs a CUDA GPU (run it on a GPU machine)", file=sys.stderr)
        return 2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from model_inputs import make_batch

    from transformers_maskcma.tiny import build_tiny_model

    torch.use_deterministic_algorithms(True)
    failures = []

    def check(name: str, passed: bool, detail: str = "") -> None:
        print(f"{'ok  ' if passed else 'FAIL'} {name} {detail}", flush=True)
        if not passed:
            failures.append(name)

    logits = torch.randn(2, 1, 32, 32, device="cuda", requires_grad=True)
    try:
        F.interpolate(logits, size=(8, 8), mode="bilinear", antialias=True).sum().backward()
        check("plain anti-aliased backward raises under deterministic algorithms", False, "(it did not raise)")
    except RuntimeError as error:
        check("plain anti-aliased backward raises under deterministic algorithms", "deterministic" in str(error))

    model, tokenizer = build_tiny_model(seed=0, mask_source="pred")
    model.to("cuda").train()
    with torch.no_grad():
        model.cma.gamma.fill_(0.5)
    batch = make_batch(tokenizer, ["Please segment the red circle.", "Segment the square."], ["It is [SEG].", "[SEG]."])
    batch = {key: value.to("cuda") for key, value in batch.items()}
    gradients = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    check("training step with the predicted prior runs under deterministic algorithms", True)
    same = all(torch.equal(gradients[0][name], gradients[1][name]) for name in gradients[0])
    check("gradients are bit-identical over two steps", same, f"({len(gradients[0])} tensors)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
