"""Where a trained demo model fails: held-out cIoU per prompt kind, and what its ``[SEG]`` embeddings encode.

    python -m benchmarks.demo_diagnostics demo_output/model [--probe-scenes 1200] [--output-dir docs/benchmarks]

Two measurements of a model folder written by `maskcma demo`:

- *per prompt kind*: the demo's held-out images (`DemoSettings` defaults, so the same split the demo scored) are
  segmented from generated answers, and cIoU is computed per prompt kind (colour, shape, colour + shape, position;
  prompts that name two objects form their own group). The answers of the first held-out images are listed;
- *linear probes*: training-like scenes drawn with another seed are run teacher-forced through the model and the
  ``[SEG]`` embedding of each single-object sample is kept. For each field of the structured query (colour, shape,
  position; "none" where the prompt does not use it) a multinomial logistic regression is fitted on three quarters
  of the embeddings and scored on the rest, beside the majority-class rate. A field the probe cannot read from the
  embedding is one SAM2 cannot be told about.

Results go to ``<output-dir>/demo_diagnostics.json``; docs/cma_ablation.md discusses them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from transformers_maskcma.demo import (
    ANSWER_STYLES,
    DemoSettings,
    demo_data,
    ground_truth,
    image_records,
    predict_masks,
    record_queries,
)
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.processing import MaskCMAProcessor
from transformers_maskcma.trainer.collator import MaskCMADataCollator
from transformers_maskcma.trainer.data import ProcessedRecords

from .common import DEFAULT_OUTPUT_DIR
from .demo_ceiling import scores_by_prompt_kind

PROBE_FIELDS = ("color", "shape", "position")
TWO_OBJECTS = "two objects"


def prompt_kind(record: dict) -> str:
    """The prompt kind of a record (`meta.prompt_kinds`), or `TWO_OBJECTS` when it refers to several objects."""
    kinds = json.loads(record["meta"])["prompt_kinds"]
    return kinds[0] if len(kinds) == 1 else TWO_OBJECTS


def per_kind_ciou(model, processor, records, batch_size: int = 32, shown_answers: int = 8) -> dict:
    """cIoU/gIoU of `model.segment` on image `records`, overall and per prompt kind, and a few answers."""
    predictions = predict_masks(model, processor, records, batch_size, "held-out images")
    truths = [ground_truth(record) for record in records]
    kinds = [prompt_kind(record) for record in records]
    result = {"images": len(records), **scores_by_prompt_kind(predictions, truths, kinds)}
    shown = records.select(range(min(shown_answers, len(records))))
    inputs = processor(images=[r["frames"][0] for r in shown], text=list(shown["prompt"]))
    output = model.segment(**inputs, max_new_tokens=16)
    result["answers"] = [{"prompt": r["prompt"], "answer": a} for r, a in zip(shown, processor.decode_answers(output.answer_ids))]
    return result


@torch.no_grad()
def seg_embeddings(model, processor, records, batch_size: int = 32) -> torch.Tensor:
    """Teacher-forced ``[SEG]`` embeddings `(num_records, 256)` of single-object records (one ``[SEG]`` each)."""
    samples = ProcessedRecords(records, processor)
    collator = MaskCMADataCollator(processor)
    embeddings = []
    for start in tqdm(range(0, len(samples), batch_size), desc="[SEG] embeddings", leave=False):
        batch = collator([samples[i] for i in range(start, min(start + batch_size, len(samples)))])
        batch.pop("original_sizes", None)
        embeddings.append(model(**batch).seg_embeds.float())
    return torch.cat(embeddings)


def linear_probe_accuracy(
    features: torch.Tensor, labels: list[str], train_fraction: float = 0.75, steps: int = 300, seed: int = 0
) -> dict:
    """Multinomial logistic regression (features standardised on the training part, small L2 penalty, Adam):
    held-out accuracy and the majority-class rate of the held-out part."""
    vocabulary = sorted(set(labels))
    targets = torch.tensor([vocabulary.index(label) for label in labels])
    cut = int(len(labels) * train_fraction)
    if cut == 0 or cut == len(labels):
        raise ValueError(f"{len(labels)} samples cannot be split {train_fraction:.0%} / rest for a probe")
    mean, std = features[:cut].mean(0), features[:cut].std(0).clamp_min(1e-6)
    standardised = (features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(features.shape[1], len(vocabulary), generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(len(vocabulary), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            logits = standardised[:cut] @ weight + bias
            loss = torch.nn.functional.cross_entropy(logits, targets[:cut]) + 1e-3 * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    predicted = (standardised[cut:] @ weight + bias).argmax(dim=1)
    held_out = targets[cut:]
    return {
        "accuracy": float((predicted == held_out).float().mean()),
        "majority_rate": float(np.bincount(held_out.numpy(), minlength=len(vocabulary)).max() / len(held_out)),
        "classes": vocabulary,
        "train_samples": cut,
        "test_samples": len(labels) - cut,
    }


def probe_seg_embeddings(model, processor, settings: DemoSettings, scenes: int) -> dict:
    """Linear-probe accuracy of each query field from the ``[SEG]`` embeddings of `scenes` training-like scenes
    (two samples each) drawn with seed `settings.seed + 1`, so none of them was trained on."""
    records, _ = demo_data(replace(settings, seed=settings.seed + 1, train_samples=2 * scenes, eval_samples=1))
    records = image_records(records)
    records = records.select([i for i, r in enumerate(records) if len(r["masks"]) == 1])
    embeddings = seg_embeddings(model, processor, records)
    queries = [record_queries(record)[0] for record in records]
    return {
        field: linear_probe_accuracy(embeddings, [str(query.get(field) or "none") for query in queries])
        for field in PROBE_FIELDS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_diagnostics", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a model folder written by `maskcma demo` (OUTPUT/model)")
    parser.add_argument("--probe-scenes", type=int, default=1200, help="scenes for the linear probes (2 samples each)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default: the demo's)")
    parser.add_argument(
        "--answer-style",
        choices=ANSWER_STYLES,
        default=None,
        help="answers of the probe's teacher-forced samples: the style the model was trained with "
        "(default: the demo's)",
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir} is not a saved model folder (no config.json); pass OUTPUT/model of a demo run")
    torch.set_num_threads(args.threads)
    model = MaskCMAModel.from_pretrained(args.model_dir).eval()
    processor = MaskCMAProcessor.from_pretrained(args.model_dir)
    settings = DemoSettings()
    if args.eval_samples is not None:
        settings = replace(settings, eval_samples=args.eval_samples)
    if args.answer_style is not None:
        settings = replace(settings, answer_style=args.answer_style)
    _, test = demo_data(replace(settings, train_samples=2))
    payload = {
        "benchmark": "demo_diagnostics",
        "model_dir": str(args.model_dir),
        "answer_style": settings.answer_style,
        "held_out": per_kind_ciou(model, processor, image_records(test)),
        "seg_probes": probe_seg_embeddings(model, processor, settings, args.probe_scenes),
    }
    for kind, values in payload["held_out"]["per_prompt_kind"].items():
        print(f"{kind:>12}: cIoU {values['ciou']:.3f} ({values['images']} images)")
    for field, values in payload["seg_probes"].items():
        print(f"probe {field:>8}: accuracy {values['accuracy']:.3f} (majority class {values['majority_rate']:.3f})")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "demo_diagnostics.json"
    path.write_text(json.dumps(payload, indent=2, allow_nan=False))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
