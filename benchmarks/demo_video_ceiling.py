"""What limits the demo's propagated frames: how fast the tiny SAM2's memory learns when the query is known.

    python -m benchmarks.demo_video_ceiling [--steps 300] [--eval-at 100 200 300] [--mode propagate|independent]
        [--memory-masks predicted|ground-truth] [--memory-layers 1] [--memory-mlp 256] [--train-clips 400]
        [--eval-clips 40]

The video counterpart of `benchmarks/demo_ceiling.py`. The ``[SEG]`` embedding is replaced by the oracle query
embedding of that script (learned vectors for the query's colour, shape, position and, for clips, motion, summed), so nothing of the
language side takes part. The tiny default's SAM2 (random weights, trained in full as in the demo, CMA off) is
trained on single-object synthetic clips of the demo's scenes (8 frames): with `--mode propagate` through SAM2's
memory (`modeling/video_training.py`: the first 5 frames decoded from the query and stored as conditioning frames,
frames 5–7 propagated, a loss on all 8), with `--mode independent` every frame decoded from the query. At each
`--eval-at` step the held-out clips are segmented by the inference path (`VideoMaskPropagation`: key frames 0–4 from
the query, 5–7 propagated) and scored with J&F separately on key and propagated frames, beside the same with the
queries shuffled across clips. With `--memory-masks ground-truth` the key frames' memories are encoded from the
ground-truth masks while training (the decoded masks still get their loss), which tells whether the memory path is
held back by poor key-frame masks early on. Each evaluation row records `train_s`, the seconds spent in training
steps so far (evaluation excluded), for comparing the step cost of two settings. Results go to
``<output-dir>/demo_video_ceiling_<mode>.json`` (``..._gt_memory.json`` with ground-truth memories,
``..._memory_<layers>x<mlp>.json`` with another memory size). The recorded runs (docs/training.md, "Can the demo's
budget reach the video targets?"): ``--steps 3000 --eval-at 250 500 1000 1500 2000 2500 3000 --train-clips 1500`` and
the same with ``--steps 2000 --memory-masks ground-truth``; and, with the memory attention of the SAM2 releases,
``--steps 3000 --eval-at 500 1000 1500 2000 2500 3000 --train-clips 1500 --memory-layers 4 --memory-mlp 2048``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transformers_maskcma.data.schema import decode_rle
from transformers_maskcma.data.synthetic import MOTIONS, SyntheticConfig, load_synthetic
from transformers_maskcma.demo import DemoSettings
from transformers_maskcma.evaluation.metrics.video import aggregate_video, video_expression_scores
from transformers_maskcma.modeling.mask_decoding import dice_loss, sigmoid_bce_loss, upsample_mask_logits
from transformers_maskcma.modeling.video_segmentation import VideoMaskPropagation
from transformers_maskcma.modeling.video_training import ClipPropagation
from transformers_maskcma.processing import MaskCMAProcessor
from transformers_maskcma.processing.image_io import sam2_preprocess
from transformers_maskcma.processing.training_features import resize_masks
from transformers_maskcma.tiny import build_tiny_model, tiny_sam2_config

from .common import DEFAULT_OUTPUT_DIR
from .demo_ceiling import QUERY_FIELDS, OracleQueryEmbedding

KEY_FRAMES = 5
VIDEO_QUERY_FIELDS = {**QUERY_FIELDS, "motion": MOTIONS}


class VideoOracleQueryEmbedding(OracleQueryEmbedding):
    """`OracleQueryEmbedding` with a fourth table for the clip queries' motion ("the circle moving left")."""

    def __init__(self, width: int):
        super().__init__(width)
        self.tables = torch.nn.ModuleDict(
            {name: torch.nn.Embedding(len(values) + 1, width) for name, values in VIDEO_QUERY_FIELDS.items()}
        )
        for table in self.tables.values():
            torch.nn.init.normal_(table.weight, std=1.0)

    @staticmethod
    def encode(query: dict) -> list[int]:
        """`[colour, shape, position, motion]` indices; the last index of each table means "not used"."""
        return [
            values.index(query[name]) if query.get(name) else len(values) for name, values in VIDEO_QUERY_FIELDS.items()
        ]


def prepare_clips(records, processor: MaskCMAProcessor) -> dict:
    """SAM2 inputs `(N, T, 3, S, S)`, query ids `(N, 3)`, loss targets `(N, T, g, g)` ("area") and full-size masks
    `(N, T, H, W)` of single-object clip records."""
    pixels, queries, targets, masks = [], [], [], []
    for record in tqdm(records, desc="preparing clips", leave=False):
        meta = json.loads(record["meta"])
        frames = record["frames"]
        size = (frames[0].size[1], frames[0].size[0])
        pixels.append(torch.stack([
            sam2_preprocess(frame, processor.sam_image_size, processor.sam_image_mean, processor.sam_image_std)
            for frame in frames
        ]))
        queries.append(VideoOracleQueryEmbedding.encode(meta["queries"][0]))
        object_masks = [decode_rle(rle, expected_size=size) for rle in record["masks"][0]]
        targets.append(resize_masks(object_masks, processor.gt_mask_size, "area"))
        masks.append(np.stack(object_masks))
    return {"pixels": torch.stack(pixels), "queries": torch.tensor(queries), "targets": torch.stack(targets),
            "masks": np.stack(masks)}


def single_object_clips(split: str, count: int, scenes: SyntheticConfig):
    records = load_synthetic(split, count, scenes, **({} if split == "train" else {"check_train_samples": 0}))
    keep = [i for i, masks in enumerate(records["masks"]) if len(masks) == 1]
    return records.select(keep)


class GroundTruthMemories:
    """While active, the key frames' memories are encoded from the ground-truth mask (logits ±10, SAM2's mask-input
    scale) instead of the decoded one; the decoded mask still gets its loss. Used with `--memory-masks
    ground-truth` to tell how fast the memory path learns once the key frames' memories are right."""

    def __init__(self, sam2, targets: torch.Tensor):
        self.sam2, self.targets, self.store = sam2, targets, sam2.store_conditioning_frame

    def __enter__(self):
        def store(session, frame_idx, decoded, object_presence):
            truth = self.targets[frame_idx].to(decoded.multimask_logits.dtype)
            truth = F.interpolate(truth[None, None], size=decoded.multimask_logits.shape[-2:], mode="bilinear")[0]
            forced = replace(decoded, multimask_logits=(20.0 * (truth > 0.5) - 10.0).expand_as(decoded.multimask_logits))
            return self.store(session, frame_idx, forced, object_presence)

        self.sam2.store_conditioning_frame = store
        return self

    def __exit__(self, *exc_info):
        del self.sam2.store_conditioning_frame


def clip_loss(model, oracle, batch_pixels, batch_queries, batch_targets, mode: str,
              memory_masks: str = "predicted") -> torch.Tensor:
    """BCE + Dice over every frame of a batch of clips `(B, T, 3, S, S)`."""
    sam2 = model.sam2
    num_clips, num_frames = batch_pixels.shape[:2]
    levels, positions = sam2.vision_levels(batch_pixels.flatten(0, 1), encoder_grad=True)
    features = sam2.features_of_levels(levels)
    prompts = oracle(batch_queries)
    no_text, no_text_mask = prompts.new_zeros(1, prompts.shape[-1]), torch.zeros(1, dtype=torch.bool)
    logits = []
    for clip in range(num_clips):
        rows = list(range(clip * num_frames, (clip + 1) * num_frames))
        if mode == "propagate":
            propagation = ClipPropagation(
                model, levels, positions, features, rows, [t < KEY_FRAMES for t in range(num_frames)],
                prompts[clip : clip + 1], no_text, no_text_mask,
            )
            if memory_masks == "ground-truth":
                with GroundTruthMemories(sam2, batch_targets[clip]):
                    results = propagation.run()
            else:
                results = propagation.run()
            logits.append(torch.cat([results[(0, t)]["mask_logits"][:, 0] for t in range(num_frames)]))
        else:
            decoded = model.decode_masks(
                features.select(torch.tensor(rows)), prompts[clip : clip + 1].expand(num_frames, -1),
                no_text[None].expand(num_frames, -1, -1), no_text_mask[None].expand(num_frames, -1),
            )
            logits.append(decoded["mask_logits"][:, 0])
    logits = torch.cat(logits)
    targets = batch_targets.flatten(0, 1)
    return 2.0 * sigmoid_bce_loss(logits, targets) + 0.5 * dice_loss(logits, targets)


@torch.no_grad()
def evaluate(model, oracle, clips: dict, shuffle: bool) -> dict:
    """J&F of the inference path on key frames (0–4) and propagated frames (5–7), queries shuffled if asked."""
    model.eval()
    queries = clips["queries"].roll(1, dims=0) if shuffle else clips["queries"]
    key_scores, propagated_scores = [], []
    for index in range(clips["pixels"].shape[0]):
        prompt = oracle(queries[index : index + 1])
        propagation = VideoMaskPropagation(
            model, clips["pixels"][index], list(range(KEY_FRAMES)), prompt,
            prompt.new_zeros(1, prompt.shape[-1]), torch.zeros(1, dtype=torch.bool),
        )
        truth = clips["masks"][index]
        prediction = np.zeros_like(truth)
        for frame in propagation:
            prediction[frame.frame_index] = (
                upsample_mask_logits(frame.mask_logits, truth.shape[-2:]) > 0
            )[0].numpy()
        key_scores.append(video_expression_scores(prediction[:KEY_FRAMES], truth[:KEY_FRAMES]))
        propagated_scores.append(video_expression_scores(prediction[KEY_FRAMES:], truth[KEY_FRAMES:]))
    model.train()
    return {"key_frames": aggregate_video(key_scores).to_dict(),
            "propagated_frames": aggregate_video(propagated_scores).to_dict()}


def run(mode: str, steps: int, eval_at: list[int], batch_size: int, learning_rate: float, train_clips: int,
        eval_clips: int, seed: int, memory_masks: str = "predicted", memory_layers: int | None = None,
        memory_mlp: int | None = None) -> dict:
    torch.manual_seed(seed)
    scenes = replace(DemoSettings().synthetic_config(), video_fraction=1.0, multi_object_fraction=0.0, seed=seed)
    sam2_config = tiny_sam2_config()
    if memory_layers is not None:
        sam2_config.memory_attention_num_layers = memory_layers
    if memory_mlp is not None:
        sam2_config.memory_attention_feed_forward_hidden_size = memory_mlp
    model, tokenizer = build_tiny_model(
        seed=seed, use_cma=False, video_training=mode, freeze_sam2_image_encoder=False, freeze_vision_tower=False,
        sam2_config=sam2_config,
    )
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    train = prepare_clips(single_object_clips("train", train_clips, scenes), processor)
    held_out = prepare_clips(single_object_clips("test", eval_clips, scenes), processor)
    oracle = VideoOracleQueryEmbedding(model.config.seg_embed_dim)
    parameters = [p for p in model.sam2.parameters() if p.requires_grad] + list(oracle.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history, losses, started, train_seconds = [], [], time.time(), 0.0
    for step in tqdm(range(1, steps + 1), desc=f"video ceiling ({mode})"):
        step_started = time.perf_counter()
        rows = torch.randint(0, train["pixels"].shape[0], (batch_size,), generator=generator)
        loss = clip_loss(model, oracle, train["pixels"][rows], train["queries"][rows], train["targets"][rows], mode,
                         memory_masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        train_seconds += time.perf_counter() - step_started
        if step in eval_at:
            history.append({
                "step": step, "clips_seen": step * batch_size, "train_loss_last_50": float(np.mean(losses[-50:])),
                "held_out": evaluate(model, oracle, held_out, shuffle=False),
                "shuffled_queries": evaluate(model, oracle, held_out, shuffle=True),
                "train_s": train_seconds, "elapsed_s": time.time() - started,
            })
            row = history[-1]
            print(
                f"step {step}: key J&F {row['held_out']['key_frames']['J&F']:.3f}, propagated "
                f"{row['held_out']['propagated_frames']['J&F']:.3f} (shuffled queries "
                f"{row['shuffled_queries']['propagated_frames']['J&F']:.3f})", flush=True,
            )
    return {"mode": mode, "memory_masks": memory_masks, "memory_attention_layers":
            model.sam2.config.memory_attention_num_layers, "memory_attention_mlp":
            model.sam2.config.memory_attention_feed_forward_hidden_size, "batch_size": batch_size, "learning_rate": learning_rate, "train_clips":
            int(train["pixels"].shape[0]), "eval_clips": int(held_out["pixels"].shape[0]), "seed": seed,
            "history": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_video_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("propagate", "independent"), default="propagate")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-at", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--train-clips", type=int, default=400)
    parser.add_argument("--eval-clips", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-masks", choices=("predicted", "ground-truth"), default="predicted",
        help="what the key frames' memories encode while training (evaluation always uses the decoded masks)",
    )
    parser.add_argument("--memory-layers", type=int, default=None, help="memory-attention layers (tiny default: 1)")
    parser.add_argument("--memory-mlp", type=int, default=None, help="memory-attention MLP width (tiny default: 256)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.mode, args.steps, args.eval_at or [args.steps], args.batch_size, args.learning_rate,
                 args.train_clips, args.eval_clips, args.seed, args.memory_masks, args.memory_layers, args.memory_mlp)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.memory_masks == "predicted" else "_gt_memory"
    if args.memory_layers is not None or args.memory_mlp is not None:
        suffix += f"_memory_{result['memory_attention_layers']}x{result['memory_attention_mlp']}"
    path = args.output_dir / f"demo_video_ceiling_{args.mode}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
