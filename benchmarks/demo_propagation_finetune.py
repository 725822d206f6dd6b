"""How much clip training the demo's propagated frames need once the model reads the prompt.

    python -m benchmarks.demo_propagation_finetune MODEL_DIR [--steps 150] [--eval-every 50] [--batch-size 2]

Continues a model saved by `maskcma demo` (e.g. `demo_output/model`, or a shortened run's) on synthetic clips only
(the demo's scenes, canonical answers, one object per clip), with `video_training="propagate"`: 8-frame clips, the
5 key frames decoded from ``[SEG]``, frames 5–7 propagated through SAM2's memory, a loss on every frame; the demo's
optimiser (AdamW, learning rates per part) at a constant rate. Before training and every `--eval-every` steps it
scores held-out clips as the demo does (`demo.evaluate_video`: J&F on key and on propagated frames, with generated
answers) beside the shuffled-prompt control. Results go to ``<output-dir>/demo_propagation_finetune.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from transformers_maskcma.data.synthetic import load_synthetic, shuffled_prompts
from transformers_maskcma.demo import DemoSettings, demo_answer, demo_optimizer, evaluate_video, video_records
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.processing import MaskCMAProcessor
from transformers_maskcma.trainer.collator import MaskCMADataCollator
from transformers_maskcma.trainer.data import ProcessedRecords

from .common import DEFAULT_OUTPUT_DIR


def scores(model, processor, clips) -> dict:
    video = evaluate_video(model, processor, clips, "held-out clips")
    control = evaluate_video(model, processor, shuffled_prompts(clips, seed=0), "shuffled prompts")
    return {
        "key_frames": video["key_frames"]["J&F"],
        "propagated_frames": video["propagated_frames"]["J&F"],
        "shuffled_key_frames": control["key_frames"]["J&F"],
        "shuffled_propagated_frames": control["propagated_frames"]["J&F"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_propagation_finetune")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--train-clips", type=int, default=300)
    parser.add_argument("--eval-clips", type=int, default=20)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    settings = DemoSettings()
    model = MaskCMAModel.from_pretrained(args.model_dir)
    model.config.video_training, model.config.video_training_clip_frames = "propagate", 8
    for parameter in model.parameters():  # the demo trains every part (full fine-tuning)
        parameter.requires_grad_(True)
    processor = MaskCMAProcessor.from_pretrained(args.model_dir)
    scenes = replace(settings.synthetic_config(), video_fraction=1.0, multi_object_fraction=0.0)
    train = load_synthetic("train", args.train_clips, scenes)
    train = train.map(lambda record: {"answer": demo_answer(record, "canonical")})
    held_out = video_records(load_synthetic("test", args.eval_clips, scenes, check_train_samples=0))
    dataset = ProcessedRecords(train, processor, video_clip_frames=8)
    collator = MaskCMADataCollator(processor)
    optimizer = demo_optimizer(model, settings)
    generator = torch.Generator().manual_seed(0)
    model.eval()
    history = [{"step": 0, **scores(model, processor, held_out)}]
    print(history[-1], flush=True)
    started = time.time()
    for step in tqdm(range(1, args.steps + 1), desc="propagation fine-tuning"):
        model.train()
        rows = torch.randint(0, len(dataset), (args.batch_size,), generator=generator).tolist()
        output = model(**collator([dataset[row] for row in rows]))
        loss = output.loss  # LM + mask + tmc_weight·TMC (the model's total)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            history.append({"step": step, "clips_seen": step * args.batch_size, "elapsed_s": time.time() - started,
                            **scores(model, processor, held_out)})
            print(history[-1], flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "demo_propagation_finetune.json"
    path.write_text(json.dumps({"model_dir": str(args.model_dir), "batch_size": args.batch_size,
                                "train_clips": len(train), "eval_clips": len(held_out), "history": history},
                               indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
