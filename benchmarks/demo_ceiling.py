"""What limits the CPU demo: how well the tiny SAM2 learns to pick the referred shape when the query is known.

    python -m benchmarks.demo_ceiling [--steps 800] [--batch-size 8] [--quick] [--output-dir docs/benchmarks]

`maskcma demo` must learn two things from random weights within a few CPU minutes: to read the prompt (the LLM's
``[SEG]`` state) and to pick one shape's mask given that state (SAM2). This script measures the second part alone.
The ``[SEG]`` embedding is replaced by an *oracle query embedding*: the sum of three learned vectors, one for each
field of the record's structured query (colour, shape, position; a "none" vector where the prompt does not use the
field). The tiny default's SAM2 (image encoder and mask decoder, random initial weights) is trained with the model's
own mask losses on synthetic images, as many images as the demo trains on, and scored on held-out images with the
referring metrics. Nothing of the language side takes part, so the held-out cIoU is an upper estimate of what the
demo can reach in the same budget.

Four runs: the generator's default scenes and the demo's (`DemoSettings.synthetic`) at learning rate 1e-4 with the
research code's nearest-resized loss targets, the demo's scenes with the demo's `gt_mask_resize="area"` targets, and
the demo's scenes at 1e-3 (a rate that stalls the random SAM2: its gradients fade while the loss stays high). The
results, per run and prompt kind, go to ``<output-dir>/demo_ceiling.json``; docs/cma_ablation.md discusses them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from transformers_maskcma.data.schema import decode_rle
from transformers_maskcma.data.synthetic import COLOR_PALETTE, POSITIONS, SHAPES, SyntheticConfig, load_synthetic
from transformers_maskcma.demo import DemoSettings
from transformers_maskcma.evaluation.metrics import image_referring_metrics
from transformers_maskcma.modeling.mask_decoding import dice_loss, sigmoid_bce_loss, upsample_mask_logits
from transformers_maskcma.processing import MaskCMAProcessor
from transformers_maskcma.processing.image_io import sam2_preprocess
from transformers_maskcma.processing.training_features import resize_masks
from transformers_maskcma.tiny import build_tiny_model

from .common import DEFAULT_OUTPUT_DIR

QUERY_FIELDS = {"color": tuple(COLOR_PALETTE), "shape": SHAPES, "position": POSITIONS}


@dataclass
class CeilingSettings:
    """One oracle-query training run: `steps` × `batch_size` training images, AdamW at `learning_rate` (cosine
    schedule, 30 warm-up steps), SAM2's image encoder trained as in the demo, loss targets resized with
    `gt_mask_resize` (`"nearest"` or `"area"`, as the processor's argument)."""

    steps: int = 800
    batch_size: int = 8
    learning_rate: float = 1e-4
    train_images: int = 6000
    eval_images: int = 200
    gt_mask_resize: str = "nearest"
    seed: int = 0


class OracleQueryEmbedding(nn.Module):
    """Maps a structured query to a SAM2 prompt token: one learned table per query field, summed.

    Args:
        width: SAM2's prompt width (256).
    """

    def __init__(self, width: int):
        super().__init__()
        self.tables = nn.ModuleDict({name: nn.Embedding(len(values) + 1, width) for name, values in QUERY_FIELDS.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=1.0)

    @staticmethod
    def encode(query: dict) -> list[int]:
        """`[colour, shape, position]` indices of a record's query; the last index of each table means "not used"."""
        return [
            values.index(query[name]) if query.get(name) else len(values) for name, values in QUERY_FIELDS.items()
        ]

    def forward(self, query_ids: torch.LongTensor) -> torch.Tensor:
        """`query_ids` `(N, 3)` → prompt tokens `(N, width)`."""
        return sum(table(query_ids[:, column]) for column, table in enumerate(self.tables.values()))


@dataclass
class PreparedImages:
    sam_pixel_values: torch.Tensor  # (N, 3, S, S)
    query_ids: torch.LongTensor  # (N, 3)
    masks: list[np.ndarray]  # N × (H, W) bool
    kinds: list[str]


def prepare(records, processor: MaskCMAProcessor) -> PreparedImages:
    """SAM2 inputs (the processor's SAM2 preprocessing), query indices, ground-truth masks and prompt kinds of
    single-object image records."""
    pixels, query_ids, masks, kinds = [], [], [], []
    for record in tqdm(records, desc="preparing images", leave=False):
        meta = json.loads(record["meta"])
        if record["media_type"] != "image" or len(meta["queries"]) != 1:
            raise ValueError(f"{record['sample_id']}: the ceiling run takes single-object image records only")
        image = record["frames"][0]
        pixels.append(
            sam2_preprocess(image, processor.sam_image_size, processor.sam_image_mean, processor.sam_image_std)
        )
        query_ids.append(OracleQueryEmbedding.encode(meta["queries"][0]))
        masks.append(decode_rle(record["masks"][0][0], expected_size=(image.size[1], image.size[0])))
        kinds.append(meta["prompt_kinds"][0])
    return PreparedImages(torch.stack(pixels), torch.tensor(query_ids), masks, kinds)


def oracle_masks(model, oracle: OracleQueryEmbedding, pixels: torch.Tensor, query_ids: torch.LongTensor):
    """Mask logits `(N, 4h, 4w)` of SAM2 prompted with the oracle query tokens (the model's CMA-free path)."""
    features = model.encode_frames(pixels)
    prompt_tokens = oracle(query_ids)
    no_text = prompt_tokens.new_zeros(prompt_tokens.shape[0], 1, prompt_tokens.shape[-1])
    no_text_mask = torch.zeros(prompt_tokens.shape[0], 1, dtype=torch.bool)
    return model.decode_masks(features, prompt_tokens, no_text, no_text_mask)["mask_logits"][:, 0]


def scores_by_prompt_kind(predictions: list, truths: list[np.ndarray], kinds: list[str]) -> dict:
    """Referring metrics of image predictions: ``{"ciou", "giou", "per_prompt_kind": {kind: {"images", "ciou",
    "giou"}}}``, overall and per prompt kind."""
    overall = image_referring_metrics(predictions, truths)
    per_kind = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        metrics = image_referring_metrics([predictions[i] for i in rows], [truths[i] for i in rows])
        per_kind[kind] = {"images": len(rows), "ciou": metrics.ciou, "giou": metrics.giou}
    return {"ciou": overall.ciou, "giou": overall.giou, "per_prompt_kind": per_kind}


def run_ceiling(scenes: SyntheticConfig, settings: CeilingSettings) -> dict:
    """Train SAM2 with oracle queries on `scenes`; held-out cIoU/gIoU overall and per prompt kind."""
    torch.manual_seed(settings.seed)
    scenes = replace(scenes, video_fraction=0.0, multi_object_fraction=0.0)
    model, tokenizer = build_tiny_model(
        seed=settings.seed, use_cma=False, freeze_sam2_image_encoder=False, freeze_vision_tower=True
    )
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    train = prepare(load_synthetic("train", settings.train_images, scenes), processor)
    test = prepare(load_synthetic("test", settings.eval_images, scenes, check_train_samples=0), processor)
    oracle = OracleQueryEmbedding(model.config.sam2_config.mask_decoder_config.hidden_size)
    parameters = [p for p in model.sam2.parameters() if p.requires_grad] + list(oracle.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / settings.steps))
    )
    generator = np.random.default_rng(settings.seed)
    model.train()
    started = time.time()
    for _ in tqdm(range(settings.steps), desc="oracle-query training", leave=False):
        index = generator.choice(len(train.kinds), settings.batch_size, replace=False)
        logits = oracle_masks(model, oracle, train.sam_pixel_values[index], train.query_ids[index])
        gt = resize_masks([train.masks[i] for i in index], logits.shape[-1], settings.gt_mask_resize)
        loss = (
            model.config.bce_loss_weight * sigmoid_bce_loss(logits, gt)
            + model.config.dice_loss_weight * dice_loss(logits, gt)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    train_seconds = time.time() - started

    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test.kinds), 50):
            stop = min(start + 50, len(test.kinds))
            logits = oracle_masks(model, oracle, test.sam_pixel_values[start:stop], test.query_ids[start:stop])
            for row, mask in enumerate(test.masks[start:stop]):
                predictions.append((upsample_mask_logits(logits[row], mask.shape) > 0).numpy())
    return {
        **scores_by_prompt_kind(predictions, test.masks, test.kinds),
        "train_seconds": train_seconds,
        "final_train_loss": float(loss.item()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 800; 3 with --quick)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few steps and images, numbers mean nothing")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        settings = CeilingSettings(steps=args.steps or 3, batch_size=2, train_images=8, eval_images=6)
    else:
        settings = CeilingSettings(steps=args.steps or 800, batch_size=args.batch_size)
    demo_scenes = SyntheticConfig(**DemoSettings().synthetic)
    runs = {
        "generator_defaults": (SyntheticConfig(), settings),
        "demo_scenes": (demo_scenes, settings),
        "demo_scenes_area_targets": (demo_scenes, replace(settings, gt_mask_resize="area")),
        "demo_scenes_lr_1e-3": (demo_scenes, replace(settings, learning_rate=1e-3)),
    }
    results = {}
    for name, (scenes, run_settings) in runs.items():
        results[name] = {
            "scenes": {k: v for k, v in vars(scenes).items() if k != "seed"},
            "learning_rate": run_settings.learning_rate,
            "gt_mask_resize": run_settings.gt_mask_resize,
            **run_ceiling(scenes, run_settings),
        }
        print(f"{name}: held-out cIoU {results[name]['ciou']:.3f} with oracle queries "
              f"({results[name]['train_seconds']:.0f} s)", flush=True)
    payload = {"benchmark": "demo_ceiling", "quick": args.quick, "settings": vars(settings), "results": results}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "demo_ceiling.json"
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=list))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
