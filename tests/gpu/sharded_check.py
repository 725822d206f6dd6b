"""Helper of tests/gpu/run_sharded.sh (GPU): prepare the runs of `maskcma train` under FSDP and DeepSpeed, then
verify what each wrote.

    python tests/gpu/sharded_check.py prepare WORK     # tiny VLM + SAM2 part folders and one training YAML per run
    python tests/gpu/sharded_check.py verify WORK NAME # checks of WORK/NAME (exit code 1 and the reasons if one fails)

The model is built from *parts* (`model.parts`: a saved VLM and a saved SAM2), the path that ZeRO-3's `zero.Init`
used to corrupt: `from_pretrained_parts` copied 0-element partitions (a size-mismatch crash for SAM2). The checks:

- the final `OUTPUT/model` loads strictly (no missing, unexpected or mismatched key), has no empty tensor and only
  finite values;
- its frozen weights (SAM2's image encoder, the VLM's vision tower) equal the part folders' (up to bf16 rounding:
  ZeRO-3 and bf16 FSDP gather 16-bit weights), so the build copied the real weights;
- trained weights moved (γ is not 0, `seg_proj` changed) and LoRA is merged (no `lora` names);
- every training log has `cma_gamma` (never skipped), the last one non-zero;
- the resumed run continued from the checkpoint: its `trainer_state.json` reaches the larger step count and its log
  history holds the first run's steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "transformers_maskcma" / "configs" / "accelerate"
FIRST_STEPS, RESUMED_STEPS = 4, 6

# name -> (LoRA, DeepSpeed config or None). FSDP comes from the accelerate config file given to `accelerate launch`.
RUNS = {
    "fsdp_lora": (True, None),
    "zero2_full": (False, "ds_zero2.json"),
    "zero3_lora": (True, "ds_zero3.json"),
    "zero3_full": (False, "ds_zero3.json"),
}


def prepare(work: Path) -> None:
    from transformers_maskcma.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    parts = work / "parts"
    model.vlm.save_pretrained(parts / "vlm")
    tokenizer.save_pretrained(parts / "vlm")
    model.sam2.save_pretrained(parts / "sam2")
    for name, (lora, deepspeed) in RUNS.items():
        for steps, suffix in ((FIRST_STEPS, ""), (RESUMED_STEPS, "_resume")):
            training = {
                "output_dir": str(work / name),
                "per_device_train_batch_size": 2,
                "max_steps": steps,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "save_steps": 2,
                "save_total_limit": 4,
                "report_to": [],
                "disable_tqdm": True,
                "bf16": True,
            }
            if deepspeed is not None:
                training["deepspeed"] = str(CONFIGS / deepspeed)
            content = {
                "model": {
                    "parts": {"vlm": str(parts / "vlm"), "sam2": str(parts / "sam2"), "tokenizer": str(parts / "vlm")},
                    "config": {"tmc_weight": 0.1, "warmup_ratio": 0.25},
                },
                "data": {"sources": [{"dataset": "synthetic", "split": "train", "options": {"num_samples": 48}}]},
                "lora": {"enabled": lora, "r": 4, "alpha": 8},
                "training": training,
            }
            (work / f"{name}{suffix}.yaml").write_text(yaml.safe_dump(content))
    print(f"prepared {work}: parts and {2 * len(RUNS)} training YAMLs")


def verify(work: Path, name: str) -> list[str]:
    from transformers import AutoModelForImageTextToText, Sam2VideoModel

    from transformers_maskcma.modeling import MaskCMAModel

    problems: list[str] = []
    lora, _ = RUNS[name]
    run = work / name
    model, info = MaskCMAModel.from_pretrained(run / "model", output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info[key]:
            problems.append(f"{key}: {sorted(info[key])[:10]}")
    state = model.state_dict()
    empty = [k for k, v in state.items() if v.numel() == 0]
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if empty:
        problems.append(f"empty tensors in the exported model: {empty[:10]}")
    if nonfinite:
        problems.append(f"non-finite tensors in the exported model: {nonfinite[:10]}")
    if any("lora" in k for k in state):
        problems.append("LoRA weights left in the exported model (not merged)")

    # frozen weights equal the part folders' (up to bf16 rounding): the build copied the real VLM and SAM2
    sam2 = Sam2VideoModel.from_pretrained(work / "parts" / "sam2")
    vlm = AutoModelForImageTextToText.from_pretrained(work / "parts" / "vlm")
    pairs = [
        ("SAM2 image encoder", model.sam2.vision_encoder, sam2.vision_encoder),
        ("VLM vision tower", model.vision_tower(), vlm.model.vision_tower),
    ]
    for label, exported, part in pairs:
        exported_state, part_state = exported.state_dict(), part.state_dict()
        if exported_state.keys() != part_state.keys() or not part_state:
            problems.append(f"{label}: the keys differ from the part folder's")
            continue
        differing = [
            k for k in part_state
            if not torch.allclose(exported_state[k].float(), part_state[k].float(), rtol=1e-2, atol=1e-2)
        ]
        if differing:
            problems.append(f"{label}: weights differ from the part folder's: {differing[:5]}")

    gamma = float(model.cma.gamma.detach().float())
    if gamma == 0.0:
        problems.append("γ is still 0 after training")

    final_state = json.loads((run / f"checkpoint-{RESUMED_STEPS}" / "trainer_state.json").read_text())
    logs = [entry for entry in final_state["log_history"] if "loss" in entry]
    steps = [entry["step"] for entry in logs]
    if final_state["global_step"] != RESUMED_STEPS or steps != list(range(1, RESUMED_STEPS + 1)):
        problems.append(f"the resumed run logged steps {steps}, global step {final_state['global_step']}")
    if not all("cma_gamma" in entry for entry in logs):
        problems.append("a training log has no cma_gamma")
    elif logs[-1]["cma_gamma"] == 0.0:
        problems.append("the last logged cma_gamma is 0")
    summary = {
        "run": name,
        "lora": lora,
        "gamma": gamma,
        "logged_gamma": [entry.get("cma_gamma") for entry in logs],
        "loss": [entry["loss"] for entry in logs],
        "problems": problems,
    }
    print(json.dumps(summary))
    return problems


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "prepare":
        prepare(Path(argv[1]))
        return 0
    if len(argv) == 3 and argv[0] == "verify":
        return 1 if verify(Path(argv[1]), argv[2]) else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
