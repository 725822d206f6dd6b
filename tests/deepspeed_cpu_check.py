"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU: `maskcma train` in two processes equals one process accumulating the same two
micro-batches, and the exported model loads strictly.

Not part of `make test` (DeepSpeed is not a dependency: its CPU accelerator compiles a shared-memory op with the
system C++ compiler, about 5 minutes the first time). Run it where `deepspeed` is installed:

    pip install deepspeed
    python tests/deepspeed_cpu_check.py [WORK_DIR]

It runs the shipped configs (configs/accelerate/ds_zero2.json, ds_zero3.json, and ds_zero3.json with
`stage3_param_persistence_threshold: 0`, which partitions γ too) with `use_cpu: true` and
`ddp_backend: gloo` (without them TrainingArguments gives every process world size 1 under DeepSpeed on CPU) and
`DS_ACCELERATOR=cpu`. Prints one JSON line per stage and exits 1 if a check fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "transformers_maskcma" / "configs" / "accelerate"
COMPONENTS = ("loss", "lm_loss", "mask_bce", "mask_dice", "prior_loss", "tmc_loss", "cma_gamma", "cma_warmup_factor")


def _config(output_dir: Path, accumulation: int, deepspeed: str | None) -> dict:
    training = {
        "output_dir": str(output_dir), "per_device_train_batch_size": 1, "gradient_accumulation_steps": accumulation,
        "max_steps": 2, "learning_rate": 0.05, "optim": "sgd", "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_steps": 1, "save_steps": 2, "report_to": [], "use_cpu": True,
        "disable_tqdm": True, "seed": 0, "data_seed": 0,
    }
    if deepspeed is not None:
        training.update(deepspeed=str(CONFIGS / deepspeed), ddp_backend="gloo")  # (an absolute path stays as is)
    return {
        "model": {"tiny": {"seed": 0}, "config": {"tmc_weight": 0.1, "warmup_ratio": 0.5}},
        "data": {"sources": [{"dataset": "synthetic", "split": "train",
                              "options": {"num_samples": 4}}], "shuffle": False},
        "lora": {"enabled": False},
        "training": training,
    }


def _train(work: Path, name: str, accumulation: int, deepspeed: str | None) -> Path:
    output = work / name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(output, accumulation, deepspeed)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "transformers_maskcma.cli", "train", str(path)]
    if deepspeed is not None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                   "-m", "transformers_maskcma.cli", "train", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return output


def _logs(output: Path) -> list[dict]:
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def main(work: Path) -> int:
    from transformers_maskcma.modeling import MaskCMAModel
    from transformers_maskcma.tiny import build_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    reference = _train(work, "single", 2, None)
    ref_model = MaskCMAModel.from_pretrained(reference / "model")
    ref_state = ref_model.state_dict()
    ref_logs = _logs(reference)
    initial = build_tiny_model(seed=0)[0].state_dict()
    moved = sum(int(not torch.equal(initial[k], v)) for k, v in ref_state.items())
    if moved < 50:  # training changed the weights, so the comparison means something
        raise SystemExit(f"only {moved} tensors moved in the one-process run")
    failed = False
    # the shipped ZeRO-3 config keeps parameters under 1e5 elements (γ among them) whole on every process; a
    # threshold of 0 partitions every parameter, so γ is read through deepspeed.zero.GatheredParameters
    partitioned = json.loads((CONFIGS / "ds_zero3.json").read_text())
    partitioned["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (work / "ds_zero3_partitioned.json").write_text(json.dumps(partitioned))
    for stage in ("ds_zero2.json", "ds_zero3.json", str(work / "ds_zero3_partitioned.json")):
        output = _train(work, Path(stage).stem, 1, stage)
        model, info = MaskCMAModel.from_pretrained(output / "model", output_loading_info=True)
        state = model.state_dict()
        problems = [f"{key}: {sorted(info[key])[:5]}" for key in ("missing_keys", "unexpected_keys") if info[key]]
        worst, worst_key = 0.0, None
        for key, value in ref_state.items():
            difference = float((state[key].float() - value.float()).abs().max()) if value.numel() else 0.0
            if difference > worst:
                worst, worst_key = difference, key
        if worst > 1e-5:
            problems.append(f"weights differ from one process: max |Δ| {worst:.2e} at {worst_key}")
        logs = _logs(output)
        for one, two in zip(ref_logs, logs):
            for name in COMPONENTS:
                if abs(one[name] - two[name]) > 1e-4 * max(1.0, abs(one[name])):
                    problems.append(f"step {one['step']} {name}: {two[name]} vs {one[name]} in one process")
        if len(logs) != len(ref_logs):
            problems.append(f"{len(logs)} logs vs {len(ref_logs)}")
        print(json.dumps({"stage": Path(stage).name, "max_weight_difference": worst,
                          "gamma": float(model.cma.gamma.detach()),
                          "reference_gamma": float(ref_model.cma.gamma.detach()),
                          "logged_gamma": [entry["cma_gamma"] for entry in logs], "problems": problems}))
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ds_cpu_"))))
