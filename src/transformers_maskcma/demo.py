"""``maskcma demo --output DIR``: train the tiny MaskCMA on synthetic shapes, prove it reads the text, publish it.

What it does, on a CPU in a few minutes:

1. generates the synthetic referring data (`transformers_maskcma.data.synthetic`): a training split and a held-out
   test split that shares no image with it (checked);
2. builds the tiny default model (random weights) and trains it with `MaskCMATrainer` — γ warm-up
   (`GammaWarmupCallback`) and the TMC loss on — as *full fine-tuning*: LoRA adapts a pretrained LLM, but the tiny
   model is random, so every part is trained, the SAM2 image encoder and the vision tower included;
3. evaluates on the held-out images: cIoU (and gIoU) of the masks `model.segment` produces from generated answers,
   and the same with the prompts shuffled across samples (`shuffled_prompts`): a model that reads the text loses
   most of its score there; the Spearman rank correlation of `scores` with the true IoU of each predicted object;
   and on the held-out clips J, F and J&F (`evaluation.metrics.video`) separately on the key frames (decoded from
   ``[SEG]``) and on the propagated frames (SAM2's memory), beside the same with shuffled prompts;
4. saves the model folder (weights, remote code, processor), reloads it and checks the reloaded model gives the
   same masks, and runs `maskcma predict` on a held-out image and a held-out clip, writing mask PNGs and overlays;
5. trains and evaluates the same model with ``use_cma=False`` (the plain Sa2VA path) — in a second process, at the
   same time as step 2 (each run is single-threaded) — and writes the comparison to ``DIR/cma_ablation.md`` (the
   repository's docs/cma_ablation.md holds a recorded run).

Targets: held-out cIoU ≥ 0.75 and at least 0.2 above the shuffled-prompt control. ``--quick`` runs the same
pipeline with a handful of steps (a smoke test, no targets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments

from .data.schema import decode_rle
from .data.synthetic import SyntheticConfig, assert_disjoint, load_synthetic, shuffled_prompts
from .evaluation.metrics import ReferringImageMetrics, image_referring_metrics
from .evaluation.metrics.image import intersection_and_union
from .evaluation.metrics.video import ExpressionScores, aggregate_video, video_expression_scores
from .modeling import MaskCMAModel

TARGET_CIOU = 0.75
TARGET_MARGIN = 0.2
#: Video targets: propagated-frame J&F at least this share of the key frames' J&F, and TARGET_MARGIN above the
#: shuffled-prompt control's propagated-frame J&F.
TARGET_PROPAGATED_SHARE = 0.8
#: Ends the sample id of a record split from a two-object scene: ``<scene id>#<object index>``.
SPLIT_MARK = "#"
#: `DemoSettings.answer_style` values.
ANSWER_STYLES = ("canonical", "prompt", "plain")


@dataclass
class DemoSettings:
    """Everything the demo run depends on (recorded in ``results.json``).

    The synthetic scenes differ from the generator's defaults in three ways: mostly images (so that the CPU budget
    goes into steps), larger shapes (30–40 % of the frame instead of 15–30 %) and 2–3 shapes instead of 2–4. The
    tiny SAM2 sees a 128-pixel frame as an 8×8 image embedding; a 20-pixel shape covers about one cell of it, and
    a randomly initialised decoder learns to pick one such shape among several far more slowly than the budget
    allows (docs/cma_ablation.md, "What limits the demo"). `model_overrides` are `tiny_config` fields: full
    fine-tuning of the random tiny model. These choices make it learn to read the prompt within minutes
    (docs/training.md, "The CPU demo"):

    - `paired_prompts`: training scenes carry prompts for two different objects and both sit in the same batch, so
      the same image asks for two different masks (only the text tells them apart). A share `two_object_fraction`
      of the scenes stays one sample whose prompt names both objects (``"the red circle and the triangle"``, two
      ``[SEG]``), the rest is split into two single-object samples; the held-out split has two-object prompts too
      (10 %), which a model trained on single objects only answers with one ``[SEG]``;
    - `answer_style`: what the answer says after each ``[SEG]``. ``"canonical"`` (default) names the query in a
      fixed form, position or motion first: ``"Sure, [SEG] left blue triangle."`` for "the blue triangle on the
      left". The LM loss makes the ``[SEG]`` hidden state predict that next word, so the ``[SEG]`` must carry the
      query; the prompt's many phrasings of a position ("the lowest", "at the bottom", "the bottommost") map to one
      word. ``"prompt"`` copies the prompt's description (``"Sure, [SEG] triangle that is red."``), ``"plain"``
      keeps the generator's ``"Sure, [SEG]."``;
    - `head_init_scale`: `seg_proj` and `text_proj` are re-initialised with std ``scale / sqrt(fan_in)`` so that the
      ``[SEG]`` embedding has the size of SAM2's other prompt tokens (the default std 0.02 suits a wide pretrained
      LLM; after a 64-wide one it is ~40× too small for the decoder to notice);
    - `gt_mask_resize="area"`: the training masks are the covered share of each 4×4-pixel cell of the 32×32 loss
      grid. The research code's nearest resize puts every target 1.5 pixels off its cell's centre, which caps a
      perfectly learnt 40-pixel shape at an IoU of about 0.85 (docs/training.md, "Resizing the ground truth");
    - learning rates per part: SAM2, the CMA and the vision tower at `learning_rate`, the language model at
      `llm_lr_scale` × it and the projection heads at `head_lr_scale` × it. A random SAM2 stalls at 1e-3 (its
      gradients fade while the loss stays high) and learns well at 1e-4; the tiny LLM needs ~1e-3 to make its
      ``[SEG]`` state depend on the prompt within the budget.

    The budget is 10 minutes on two CPU cores for the whole demo. `steps` and `train_samples` are sized for it,
    and `train_video_fraction` sets the share of training scenes that are clips (5 %; the held-out split keeps
    `synthetic`'s 10 %, 20 clips). A clip is trained through SAM2's memory (`video_training="propagate"`) and
    costs several images' time, so at the same share as the held-out split they took about half of the training
    time (docs/training.md, "The CPU demo").
    """

    train_samples: int = 5000
    eval_samples: int = 200
    steps: int = 1350
    batch_size: int = 4
    learning_rate: float = 1e-4
    llm_lr_scale: float = 10.0
    head_lr_scale: float = 1.0
    head_init_scale: float | None = 1.0
    paired_prompts: bool = True
    two_object_fraction: float = 0.2
    answer_style: str = "canonical"
    gt_mask_resize: str = "area"
    weight_decay: float = 0.05
    lr_warmup: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_batch_size: int = 32
    threads: int = 1
    ablation: bool = True
    synthetic: dict = field(
        default_factory=lambda: {"video_fraction": 0.1, "min_shape_size": 0.3, "max_shape_size": 0.4, "max_shapes": 3}
    )
    train_video_fraction: float | None = 0.05
    model_overrides: dict = field(
        default_factory=lambda: {
            "freeze_sam2_image_encoder": False,
            "freeze_vision_tower": False,
            "tmc_weight": 0.1,
            "warmup_ratio": 0.1,
            "video_training": "propagate",
            "video_training_clip_frames": 8,
        }
    )

    def synthetic_config(self) -> SyntheticConfig:
        """The held-out split's scenes (`synthetic`)."""
        return SyntheticConfig(seed=self.seed, **self.synthetic)

    def train_synthetic_config(self) -> SyntheticConfig:
        """The training scenes: `synthetic` with the clip share `train_video_fraction` (`None`: the same share)."""
        config = self.synthetic_config()
        if self.train_video_fraction is None:
            return config
        return replace(config, video_fraction=self.train_video_fraction)


#: A smoke run of the whole pipeline (tests): a few steps, a few samples (a held-out clip among them), no targets.
QUICK_SETTINGS = DemoSettings(
    train_samples=16, eval_samples=12, steps=3, batch_size=4, eval_batch_size=8, synthetic={"video_fraction": 0.3},
    train_video_fraction=None,
)


@dataclass
class RunResult:
    """One trained model's numbers."""

    use_cma: bool
    ciou: float
    giou: float
    shuffled_ciou: float
    shuffled_giou: float
    train_runtime_s: float
    eval_runtime_s: float
    final_logs: dict
    score_iou_spearman: float | None = None
    video: dict | None = None
    shuffled_video: dict | None = None

    @property
    def margin(self) -> float:
        return self.ciou - self.shuffled_ciou


# -- data ------------------------------------------------------------------------------------------------------


def demo_data(settings: DemoSettings) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training records and the held-out test split.

    The held-out split is the generator's standard one (10 % of its prompts name two objects). With
    `paired_prompts` the training scenes are drawn with two referred objects each (``multi_object_fraction=1``);
    `split_object_pairs` keeps a share `two_object_fraction` of them whole and splits the others into two adjacent
    single-object samples. The answers follow `answer_style`. The test split is checked to share no image or clip
    with the training scenes either way."""
    if settings.answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer_style={settings.answer_style!r} is not valid; use one of {list(ANSWER_STYLES)}")
    if not 0.0 <= settings.two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction={settings.two_object_fraction} must lie in [0, 1]")
    config = settings.train_synthetic_config()
    if settings.paired_prompts:
        scenes = max(1, settings.train_samples // 2)
        check = load_synthetic("train", scenes, replace(config, multi_object_fraction=1.0))
        train = split_object_pairs(check, keep_fraction=settings.two_object_fraction, seed=settings.seed)
    else:
        train = check = load_synthetic("train", settings.train_samples, config)
    test = load_synthetic("test", settings.eval_samples, settings.synthetic_config(), check_train_samples=0)
    assert_disjoint(check, test)
    if settings.answer_style != "plain":
        style = settings.answer_style
        train = train.map(lambda record: {"answer": demo_answer(record, style)}, desc=f"{style} answers")
    return train, test


def split_object_pairs(records: datasets.Dataset, keep_fraction: float = 0.0, seed: int = 0) -> datasets.Dataset:
    """Split two-object records (prompt ``"A and B"``, two masks) into two adjacent single-object records (prompt
    ``A`` with the first mask and sample id ``<id>#0``, ``B`` with the second and ``<id>#1``); a share
    `keep_fraction` of them, drawn with `seed`, stays whole. The generator's descriptions never contain "and", so
    the split is exact; records with one object are kept as they are. Every record keeps its scene's ``meta``
    (`record_queries` picks a split record's own query) and gets an empty answer (the processor's default)."""
    columns = {name: [] for name in records.column_names}
    keep = np.random.default_rng(seed).random(len(records)) < keep_fraction
    # frames stay encoded (PNG bytes): nothing is decoded here or encoded again by `from_dict`
    encoded = records.cast_column("frames", datasets.Sequence(datasets.Image(decode=False)))
    for index, record in enumerate(encoded):
        parts = record["prompt"].split(" and ")
        if len(record["masks"]) == 1 or keep[index]:
            pieces = [(record["prompt"], record["masks"], record["sample_id"])]
        elif len(parts) == len(record["masks"]):
            pieces = [
                (part, [masks], f"{record['sample_id']}{SPLIT_MARK}{k}")
                for k, (part, masks) in enumerate(zip(parts, record["masks"]))
            ]
        else:
            raise ValueError(
                f"record {record['sample_id']}: prompt {record['prompt']!r} does not split into "
                f"{len(record['masks'])} descriptions"
            )
        for prompt, masks, sample_id in pieces:
            for name in records.column_names:
                columns[name].append(record[name])
            columns["prompt"][-1], columns["masks"][-1], columns["sample_id"][-1] = prompt, masks, sample_id
            columns["answer"][-1] = ""
    return datasets.Dataset.from_dict(columns, features=encoded.features).cast(records.features)


def scene_id(sample_id: str) -> str:
    """The scene a record comes from: its sample id without the ``#k`` of `split_object_pairs`."""
    return sample_id.split(SPLIT_MARK, 1)[0]


def record_queries(record: dict) -> list[dict]:
    """The structured queries (``color``, ``shape``, ``position``, ``motion``; ``None`` where unused) of a
    synthetic record's referred objects, in mask order. A record split from a two-object scene keeps the scene's
    ``meta`` and uses the query its sample id (``<id>#k``) names."""
    queries = json.loads(record["meta"])["queries"]
    if SPLIT_MARK in record["sample_id"]:
        return [queries[int(record["sample_id"].rsplit(SPLIT_MARK, 1)[1])]]
    return queries


def canonical_description(query: dict) -> str:
    """``"left blue triangle"``: the query's position or motion, colour and shape (``"object"`` without one)."""
    words = (query.get("position") or query.get("motion"), query.get("color"), query.get("shape") or "object")
    return " ".join(word for word in words if word)


def prompt_description(prompt: str) -> list[str]:
    """The descriptions of a prompt without their article: ``"the red circle and the triangle"`` → ``["red circle",
    "triangle"]``."""
    return [part[4:] if part.startswith("the ") else part for part in prompt.split(" and ")]


def demo_answer(record: dict, style: str) -> str:
    """The training answer of a record: ``"Sure, [SEG] left blue triangle."`` (`style="canonical"`) or
    ``"Sure, [SEG] blue triangle on the left."`` (`"prompt"`), one ``[SEG]`` and description per object."""
    if style == "canonical":
        descriptions = [canonical_description(query) for query in record_queries(record)]
    elif style == "prompt":
        descriptions = prompt_description(record["prompt"])
    else:
        raise ValueError(f"answer style {style!r} writes no description; use one of {list(ANSWER_STYLES[:2])}")
    return "Sure, " + " and ".join(f"[SEG] {description}" for description in descriptions) + "."


def image_records(records: datasets.Dataset) -> datasets.Dataset:
    """The image samples of a split (cIoU is the referring *image* metric)."""
    media = records["media_type"]
    return records.select([i for i, kind in enumerate(media) if kind == "image"])


def ground_truth(record: dict) -> np.ndarray:
    """Union of the referred objects' masks of an image record, `(H, W)` bool."""
    width, height = record["frames"][0].size
    union = np.zeros((height, width), dtype=bool)
    for object_masks in record["masks"]:
        union |= decode_rle(object_masks[0], expected_size=(height, width))
    return union


# -- training and evaluation -----------------------------------------------------------------------------------


def train_model(settings: DemoSettings, train: datasets.Dataset, use_cma: bool, output_dir: Path):
    """Build the tiny model with `use_cma`, train it on `train`; returns `(model, processor, trainer)`."""
    from .processing import MaskCMAProcessor
    from .tiny import build_tiny_model
    from .trainer.collator import MaskCMADataCollator
    from .trainer.data import ProcessedRecords
    from .trainer.trainer import MaskCMATrainer

    model, tokenizer = build_tiny_model(seed=settings.seed, use_cma=use_cma, **settings.model_overrides)
    if settings.head_init_scale is not None:
        reinit_projection_heads(model, settings.head_init_scale, seed=settings.seed)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer, gt_mask_resize=settings.gt_mask_resize)
    on_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=settings.lr_warmup,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        logging_steps=max(1, settings.steps // 12),
        save_strategy="no",
        report_to="none",
        use_cpu=on_cpu,
        bf16=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=settings.seed,
        data_seed=settings.seed,
    )
    collator = MaskCMADataCollator(processor)
    propagate = model.config.video_training == "propagate"  # clips through SAM2's memory, a loss on every frame
    dataset = ProcessedRecords(
        train,
        processor,
        video_clip_frames=model.config.video_training_clip_frames if propagate else None,
        clip_seed=settings.seed,
    )
    if settings.paired_prompts:
        # an item is a scene with two referred objects: batch_size // 2 scenes give batch_size masks a step
        dataset, data_collator = SceneGroups(dataset, train), FlattenCollator(collator)
        args.per_device_train_batch_size = max(1, settings.batch_size // 2)
    else:
        data_collator = collator
    trainer = MaskCMATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=data_collator,
        optimizers=(demo_optimizer(model, settings), None),
    )
    trainer.train()
    non_finite = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if non_finite:
        raise RuntimeError(
            f"training diverged: {len(non_finite)} parameter tensors hold NaN/inf (first: {non_finite[0]}); "
            "lower DemoSettings.learning_rate or try another --seed"
        )
    model.eval()
    return model, processor, trainer


HEAD_MODULES = ("seg_proj", "text_proj")


def reinit_projection_heads(model: MaskCMAModel, scale: float, seed: int = 0) -> None:
    """Re-initialise the linear layers of `seg_proj` and `text_proj`: weights ~ N(0, (scale / sqrt(fan_in))²),
    zero biases (see `DemoSettings`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in HEAD_MODULES:
            for module in getattr(model, name).modules():
                if isinstance(module, torch.nn.Linear):
                    std = scale / module.in_features**0.5
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.zero_()


def demo_optimizer(model: MaskCMAModel, settings: DemoSettings) -> torch.optim.Optimizer:
    """AdamW with the recipe's decoupled weight decay on matrices (not on biases and norms); the language model
    at `llm_lr_scale` and the projection heads at `head_lr_scale` × the learning rate. `Trainer` adds the cosine
    schedule (it scales every group's rate alike)."""
    from .trainer.lora import language_model_prefix

    llm_prefix = language_model_prefix(model) + "."
    scales = {"llm": settings.llm_lr_scale, "head": settings.head_lr_scale, "other": 1.0}
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "head" if name.startswith(HEAD_MODULES) else "llm" if name.startswith(llm_prefix) else "other"
        groups.setdefault((part, parameter.ndim >= 2), []).append(parameter)
    param_groups = [
        {
            "params": params,
            "lr": settings.learning_rate * scales[part],
            "weight_decay": settings.weight_decay if decays else 0.0,
        }
        for (part, decays), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=settings.learning_rate)


class SceneGroups(torch.utils.data.Dataset):
    """Items are the samples of one scene (consecutive records with the same `scene_id`): the two single-object
    samples of a split scene, or one sample that refers to both objects. Shuffling items keeps a scene's samples
    in the same batch.

    Args:
        samples: the processed samples, indexed like `records`.
        records: the records (`split_object_pairs` output).
    """

    def __init__(self, samples: torch.utils.data.Dataset, records: datasets.Dataset):
        if len(samples) != len(records):
            raise ValueError(f"{len(samples)} processed samples for {len(records)} records")
        self.samples = samples
        self.groups: list[list[int]] = []
        previous = None
        for index, sample_id in enumerate(records["sample_id"]):
            scene = scene_id(sample_id)
            if scene != previous:
                self.groups.append([])
                previous = scene
            self.groups[-1].append(index)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list:
        return [self.samples[i] for i in self.groups[index]]


class FlattenCollator:
    """Flattens a batch of scene groups and collates the samples with `MaskCMADataCollator`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, groups: list[list]) -> dict:
        return self.collator([sample for group in groups for sample in group])


@torch.no_grad()
def predict_objects(model: MaskCMAModel, processor, records: datasets.Dataset, batch_size: int, desc: str) -> list:
    """`model.segment` on image records, batched; returns per record `(masks, scores)`: the predicted masks
    `(num_objects, H, W)` bool and their `scores` `(num_objects,)` (SAM2's predicted IoU), as numpy arrays."""
    device = next(model.parameters()).device
    predictions = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        batch = records.select(range(start, min(start + batch_size, len(records))))
        inputs = processor(images=[r["frames"][0] for r in batch], text=list(batch["prompt"]))
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        output = model.segment(**inputs, max_new_tokens=16)
        for masks, scores in zip(output.masks, output.scores):
            predictions.append((masks.cpu().numpy(), scores.float().cpu().numpy()))
    return predictions


def union_prediction(masks: np.ndarray) -> np.ndarray | None:
    """The union of a record's predicted masks `(H, W)`, `None` when the answer had no ``[SEG]``."""
    return masks.any(axis=0) if masks.shape[0] else None


def predict_masks(model: MaskCMAModel, processor, records: datasets.Dataset, batch_size: int, desc: str) -> list:
    """Per image record, the union of its predicted masks `(H, W)` (`None` without ``[SEG]``)."""
    return [union_prediction(masks) for masks, _ in predict_objects(model, processor, records, batch_size, desc)]


def evaluate_referring(
    model, processor, records: datasets.Dataset, batch_size: int, desc: str
) -> ReferringImageMetrics:
    """gIoU/cIoU (`evaluation.metrics.image_referring_metrics`) of the model on image records."""
    predictions = predict_masks(model, processor, records, batch_size, desc)
    return image_referring_metrics(predictions, [ground_truth(r) for r in records])


def object_ground_truths(record: dict) -> list[np.ndarray]:
    """The ground-truth mask of each referred object of an image record, `(H, W)` bool, in mask order."""
    width, height = record["frames"][0].size
    return [decode_rle(object_masks[0], expected_size=(height, width)) for object_masks in record["masks"]]


def scores_and_true_ious(predictions: list, records: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Pairs `(score, actual IoU)` of every predicted object of the records whose answer has one ``[SEG]`` per
    referred object (object k of the answer is scored against referred object k)."""
    scores, ious = [], []
    for (masks, object_scores), record in zip(predictions, records):
        truths = object_ground_truths(record)
        if masks.shape[0] != len(truths):
            continue
        for mask, score, truth in zip(masks, object_scores, truths):
            intersection, union = intersection_and_union(mask, truth)
            scores.append(float(score))
            ious.append(intersection / union if union else 1.0)
    return np.asarray(scores), np.asarray(ious)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson correlation of the average ranks); `None` with fewer than two pairs or
    a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman_correlation needs pairs, got {len(x)} and {len(y)} values")
    if len(x) < 2:
        return None
    rank_x, rank_y = average_ranks(np.asarray(x, float)), average_ranks(np.asarray(y, float))
    if rank_x.std() == 0 or rank_y.std() == 0:
        return None
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def video_records(records: datasets.Dataset) -> datasets.Dataset:
    """The video clips of a split."""
    media = records["media_type"]
    return records.select([i for i, kind in enumerate(media) if kind == "video"])


def video_ground_truth(record: dict) -> np.ndarray:
    """Union of the referred objects' masks in every frame of a clip, `(T, H, W)` bool (absent frames empty)."""
    width, height = record["frames"][0].size
    union = np.zeros((len(record["frames"]), height, width), dtype=bool)
    for object_masks in record["masks"]:
        for t, rle in enumerate(object_masks):
            if rle is not None:
                union[t] |= decode_rle(rle, expected_size=(height, width))
    return union


@torch.no_grad()
def predict_video(model: MaskCMAModel, processor, record: dict) -> tuple[np.ndarray, list[int]]:
    """`model.segment` on one clip: the union of the predicted objects in every frame `(T, H, W)` bool, and the
    key frames the VLM saw (SAM2's conditioning frames; the others are propagated)."""
    device = next(model.parameters()).device
    inputs = processor(videos=list(record["frames"]), text=record["prompt"])
    key_frames = [int(k) for k in torch.as_tensor(inputs["key_frame_indices"]).reshape(-1).tolist()]
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    output = model.segment(**inputs, max_new_tokens=16)
    masks = output.masks[0].cpu().numpy()
    width, height = record["frames"][0].size
    union = masks.any(axis=0) if masks.shape[0] else np.zeros((len(record["frames"]), height, width), dtype=bool)
    return union, sorted(set(key_frames))


def evaluate_video(model, processor, clips: datasets.Dataset, desc: str) -> dict:
    """J, F and J&F (`evaluation.metrics.video`) of the model on held-out clips, separately over the key frames
    (decoded from ``[SEG]``) and over the propagated frames (SAM2's memory): each clip's frames of one kind form
    an expression's frames; the metrics average over clips. Also the share of frames with a non-empty mask where
    the target is present."""
    key_scores: list[ExpressionScores] = []
    propagated_scores: list[ExpressionScores] = []
    present = shown = 0
    for record in tqdm(clips, desc=desc, unit="clip"):
        prediction, key_frames = predict_video(model, processor, record)
        truth = video_ground_truth(record)
        propagated = [t for t in range(len(truth)) if t not in key_frames]
        key_scores.append(video_expression_scores(prediction[key_frames], truth[key_frames]))
        if propagated:
            propagated_scores.append(video_expression_scores(prediction[propagated], truth[propagated]))
        target_frames = truth.any(axis=(1, 2))
        present += int(target_frames.sum())
        shown += int((prediction.any(axis=(1, 2)) & target_frames).sum())
    result = {"n_clips": len(clips), "nonempty_where_present": shown / present if present else None}
    for name, scores in (("key_frames", key_scores), ("propagated_frames", propagated_scores)):
        result[name] = aggregate_video(scores).to_dict() if scores else None
    return result


def train_and_evaluate(
    settings: DemoSettings,
    train: datasets.Dataset,
    held_out: datasets.Dataset,
    use_cma: bool,
    work_dir: Path,
    held_out_clips: datasets.Dataset | None = None,
):
    """Train one model and score it on the held-out images (cIoU, gIoU and the rank correlation of `scores` with
    the true IoU) and clips (J, F, J&F on key and on propagated frames), each beside the shuffled-prompt control."""
    label = "CMA on" if use_cma else "CMA off"
    print(f"\n== training the tiny model ({label}) for {settings.steps} steps ==", flush=True)
    started = time.time()
    model, processor, trainer = train_model(settings, train, use_cma, work_dir / ("cma_on" if use_cma else "cma_off"))
    train_runtime = time.time() - started
    started = time.time()
    predictions = predict_objects(model, processor, held_out, settings.eval_batch_size, f"held-out ({label})")
    metrics = image_referring_metrics(
        [union_prediction(masks) for masks, _ in predictions], [ground_truth(r) for r in held_out]
    )
    spearman = spearman_correlation(*scores_and_true_ious(predictions, held_out))
    control = evaluate_referring(
        model, processor, shuffled_prompts(held_out, seed=settings.seed), settings.eval_batch_size,
        f"shuffled prompts ({label})",
    )
    video = shuffled_video = None
    if held_out_clips is not None and len(held_out_clips):
        video = evaluate_video(model, processor, held_out_clips, f"held-out clips ({label})")
        shuffled_video = evaluate_video(
            model, processor, shuffled_prompts(held_out_clips, seed=settings.seed), f"shuffled clip prompts ({label})"
        )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = RunResult(
        use_cma=use_cma,
        ciou=metrics.ciou,
        giou=metrics.giou,
        shuffled_ciou=control.ciou,
        shuffled_giou=control.giou,
        train_runtime_s=train_runtime,
        eval_runtime_s=time.time() - started,
        final_logs=logs[-1] if logs else {},
        score_iou_spearman=spearman,
        video=video,
        shuffled_video=shuffled_video,
    )
    print(
        f"{label}: held-out cIoU {result.ciou:.3f} (gIoU {result.giou:.3f}); shuffled prompts cIoU "
        f"{result.shuffled_ciou:.3f} (gIoU {result.shuffled_giou:.3f}); Spearman(scores, IoU) "
        f"{_number(result.score_iou_spearman)}",
        flush=True,
    )
    if video is not None:
        print(f"{label}: {video_line(video, shuffled_video)}", flush=True)
    return model, processor, result


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def video_line(video: dict, shuffled: dict | None) -> str:
    """One line of video numbers: J&F (J, F) on key and on propagated frames, and the shuffled-prompt control."""

    def part(scores: dict | None) -> str:
        if scores is None:
            return "n/a"
        return f"J&F {scores['J&F']:.3f} (J {scores['J']:.3f}, F {scores['F']:.3f})"

    line = (
        f"held-out clips ({video['n_clips']}): key frames {part(video['key_frames'])}; propagated frames "
        f"{part(video['propagated_frames'])}"
    )
    if shuffled is not None:
        line += (
            f"; shuffled prompts: key frames {part(shuffled['key_frames'])}, propagated frames "
            f"{part(shuffled['propagated_frames'])}"
        )
    return line


class AblationRun:
    """The ``use_cma=False`` run, trained and scored in a second process while this one trains with the CMA.

    The two runs are independent and single-threaded by default, so on two cores they take the time of one. The
    child reads the same records (saved with `datasets.Dataset.save_to_disk`) and writes its console output to
    ``<work_dir>/cma_off.log``; :meth:`result` waits for it and prints its summary line."""

    def __init__(
        self,
        settings: DemoSettings,
        train: datasets.Dataset,
        held_out: datasets.Dataset,
        work_dir: Path,
        held_out_clips: datasets.Dataset | None = None,
    ):
        import concurrent.futures
        import multiprocessing

        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / "cma_off.log"
        self._data_dir = data_dir = work_dir / "cma_off_data"
        train.save_to_disk(str(data_dir / "train"))
        held_out.save_to_disk(str(data_dir / "held_out"))
        if held_out_clips is not None:
            held_out_clips.save_to_disk(str(data_dir / "held_out_clips"))
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        self._future = self._executor.submit(_ablation_worker, settings, data_dir, work_dir, self.log_path)
        print(f"(the CMA-off run trains in a second process; its log: {self.log_path})", flush=True)

    def result(self) -> RunResult:
        print("\n== waiting for the CMA-off run ==", flush=True)
        try:
            result = self._future.result()
        except Exception as error:
            raise RuntimeError(f"the CMA-off run failed ({error}); its log: {self.log_path}") from error
        finally:
            self._executor.shutdown()
            shutil.rmtree(self._data_dir)
        print(
            f"CMA off: held-out cIoU {result.ciou:.3f} (gIoU {result.giou:.3f}); shuffled prompts cIoU "
            f"{result.shuffled_ciou:.3f} (gIoU {result.shuffled_giou:.3f})",
            flush=True,
        )
        if result.video is not None:
            print(f"CMA off: {video_line(result.video, result.shuffled_video)}", flush=True)
        return result


def _ablation_worker(settings: DemoSettings, data_dir: Path, work_dir: Path, log_path: Path) -> RunResult:
    """Child-process entry point of :class:`AblationRun`."""
    with open(log_path, "w", buffering=1) as log:
        sys.stdout = sys.stderr = log
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        train = datasets.load_from_disk(str(data_dir / "train"))
        held_out = datasets.load_from_disk(str(data_dir / "held_out"))
        clips_dir = data_dir / "held_out_clips"
        clips = datasets.load_from_disk(str(clips_dir)) if clips_dir.exists() else None
        _, _, result = train_and_evaluate(settings, train, held_out, False, work_dir, clips)
        return result


# -- saving, reloading, predicting -----------------------------------------------------------------------------


@dataclass
class RoundTripCheck:
    """The save/reload check: masks of the saved-and-reloaded model against the model in memory.

    Args:
        compared_masks: masks compared: from generated answers (where both models produced one) and from a forward
            pass with the ground-truth answer (one mask per ``[SEG]``, whatever the model would generate).
        identical: every compared mask is equal, the same records have generated masks, and at least one mask was
            compared (a check without masks proves nothing and fails).
        message: what was compared or what differs.
    """

    compared_masks: int
    identical: bool
    message: str


def compare_round_trip(before: list, after: list, forced_before: list, forced_after: list) -> RoundTripCheck:
    """Compare per-record masks before and after reloading (`None` = no mask generated for that record).

    `before`/`after` are the masks of generated answers (`predict_masks`); `forced_before`/`forced_after` boolean
    arrays `(num_masks, h, w)` from a forward pass with the ground-truth answer."""
    if len(before) != len(after) or len(forced_before) != len(forced_after):
        return RoundTripCheck(0, False, "the two models were checked on different numbers of records")
    compared = 0
    for index, (a, b) in enumerate(zip(before, after)):
        if (a is None) != (b is None):
            which = "the reloaded model" if b is None else "the model in memory"
            return RoundTripCheck(compared, False, f"record {index}: {which} generated no mask, the other did")
        if a is not None:
            compared += 1
            if not np.array_equal(a, b):
                return RoundTripCheck(compared, False, f"record {index}: the generated masks differ")
    for index, (a, b) in enumerate(zip(forced_before, forced_after)):
        if a.shape != b.shape or not np.array_equal(a, b):
            return RoundTripCheck(compared, False, f"record {index}: the masks of the ground-truth answer differ")
        compared += int(a.shape[0])
    if compared == 0:
        return RoundTripCheck(0, False, "no mask to compare: neither model produced a mask, so nothing was checked")
    return RoundTripCheck(compared, True, f"{compared} masks identical")


def forced_answer_masks(model: MaskCMAModel, processor, records: datasets.Dataset) -> list[np.ndarray]:
    """Per record, the masks `(num_objects, h, w)` (logits > 0) of a forward pass with its ground-truth answer."""
    from .trainer.collator import MaskCMADataCollator
    from .trainer.data import ProcessedRecords

    samples = ProcessedRecords(records, processor)
    collator = MaskCMADataCollator(processor)
    device = next(model.parameters()).device
    masks = []
    with torch.no_grad():
        for index in range(len(samples)):
            batch = collator([samples[index]])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            output = model(**batch)
            masks.append((output.pred_masks.float() > 0).cpu().numpy().reshape(-1, *output.pred_masks.shape[-2:]))
    return masks


def save_and_reload(model: MaskCMAModel, processor, folder: Path, check_records: datasets.Dataset) -> RoundTripCheck:
    """Save the model folder, reload it, and check the reloaded model gives the same masks on `check_records`
    (`compare_round_trip`: generated masks where there are some, and the masks of the ground-truth answers)."""
    from .processing import MaskCMAProcessor, save_model_folder

    save_model_folder(model, processor, folder)
    reloaded = MaskCMAModel.from_pretrained(folder).eval()
    reloaded_processor = MaskCMAProcessor.from_pretrained(folder)
    model.eval()
    before = predict_masks(model, processor, check_records, len(check_records), "masks before saving")
    after = predict_masks(reloaded, reloaded_processor, check_records, len(check_records), "masks after reloading")
    forced_before = forced_answer_masks(model, processor, check_records)
    forced_after = forced_answer_masks(reloaded, reloaded_processor, check_records)
    return compare_round_trip(before, after, forced_before, forced_after)


def write_inputs(record: dict, folder: Path) -> Path:
    """Write a record's media as an image file (images) or a folder of frames (videos); returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    if record["media_type"] == "image":
        path = folder / "image.png"
        record["frames"][0].save(path)
        return path
    frames_dir = folder / "video"
    frames_dir.mkdir(exist_ok=True)
    for index, frame in enumerate(record["frames"]):
        frame.save(frames_dir / f"{index:05d}.png")
    return frames_dir


def run_predictions(model_dir: Path, test: datasets.Dataset, output_dir: Path) -> list[dict]:
    """`maskcma predict` on the first held-out image and the first held-out clip."""
    from .processing.commands import run_predict

    summaries = []
    for media in ("image", "video"):
        rows = [i for i, kind in enumerate(test["media_type"]) if kind == media]
        if not rows:
            continue
        record = test[rows[0]]
        source = write_inputs(record, output_dir / "inputs")
        summary = run_predict(
            model_path=model_dir,
            text=record["prompt"],
            input_path=source,
            output_dir=output_dir / "predict" / media,
            with_rle=True,
        )
        summary["prompt"] = record["prompt"]
        if media == "video":  # what the overlay GIF shows: frames where some object has a mask
            summary["frames_with_mask"] = sum(
                any(decode_rle(obj["rle"][t]).any() for obj in summary["objects"])
                for t in range(summary["num_frames"])
            )
        summaries.append(summary)
        print(f"predict ({media}): {record['prompt']!r} -> answer {summary['answer']!r}, wrote {summary['output']}")
    return summaries


# -- report ----------------------------------------------------------------------------------------------------


def ablation_markdown(settings: DemoSettings, runs: list[RunResult], wall_time_s: float) -> str:
    """The CMA on/off table as markdown."""
    lines = [
        "# CMA on vs off on the synthetic demo",
        "",
        "Written by `maskcma demo`: the tiny MaskCMA model (random initial weights, full fine-tuning) trained on "
        "synthetic coloured shapes with `MaskCMATrainer` (γ warm-up, TMC loss), scored on held-out images with masks "
        "from `model.segment` (generated answers). *Shuffled* gives every held-out image another sample's prompt: a "
        "model that reads the text drops there.",
        "",
        "| model | held-out cIoU | held-out gIoU | shuffled-prompt cIoU | cIoU − shuffled | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        name = "CMA on (`use_cma=True`)" if run.use_cma else "CMA off (`use_cma=False`, plain Sa2VA path)"
        lines.append(
            f"| {name} | {run.ciou:.3f} | {run.giou:.3f} | {run.shuffled_ciou:.3f} | {run.margin:+.3f} | "
            f"{run.train_runtime_s:.0f} |"
        )
    lines += [
        "",
        f"Settings: {settings.steps} steps × batch {settings.batch_size}, AdamW lr {settings.learning_rate:g} "
        f"(language model ×{settings.llm_lr_scale:g}, projection heads ×{settings.head_lr_scale:g}; cosine, "
        f"{settings.lr_warmup:.0%} warm-up), weight decay {settings.weight_decay}, grad clip "
        f"{settings.max_grad_norm}; loss targets resized with `gt_mask_resize={settings.gt_mask_resize!r}`; "
        f"answers `{settings.answer_style}`, paired prompts {settings.paired_prompts} (two-object share "
        f"{settings.two_object_fraction:g}); "
        f"{settings.train_samples} training and {settings.eval_samples} held-out samples "
        f"(synthetic overrides {settings.synthetic}; clip share of the training scenes "
        f"{settings.train_synthetic_config().video_fraction:g}); model overrides {settings.model_overrides}; seed "
        f"{settings.seed}. Whole demo wall time {wall_time_s:.0f} s on {os.cpu_count()} CPU core(s).",
        "",
    ]
    return "\n".join(lines)


#: What the demo writes in its output folder (recorded in the folder's manifest, removed by ``--overwrite``).
DEMO_OUTPUTS = ("work", "model", "inputs", "predict", "cma_ablation.md", "results.json")


def run_demo(output_dir: str | Path, settings: DemoSettings | None = None, overwrite: bool = False) -> dict:
    """Run the whole demo (module docstring); returns the results dict also written to ``results.json``.

    The output folder belongs to one demo run (`run_folder.RunFolder`): a used folder is refused unless
    `overwrite`, which removes what the earlier demo wrote. A save/reload check that fails raises `RuntimeError`
    after the results are written."""
    settings = settings or DemoSettings()
    output_dir = Path(output_dir)
    from .run_folder import RunFolder

    fingerprint = {k: v for k, v in asdict(settings).items() if k != "threads"}
    folder = RunFolder.claim(output_dir, command="demo", fingerprint=fingerprint, overwrite=overwrite)
    entries_before = {entry.name for entry in output_dir.iterdir()}
    folder.record(*DEMO_OUTPUTS)  # before writing: --overwrite also removes what a crashed demo left
    started = time.time()
    torch.manual_seed(settings.seed)
    if settings.threads > 0:
        # one thread by default: with other processes on the cores, OpenMP's spinning makes a 2-thread run many
        # times slower, while on an idle 2-core machine the second thread gains little for these small tensors
        torch.set_num_threads(settings.threads)

    print("== generating synthetic data ==", flush=True)
    train, test = demo_data(settings)
    held_out = image_records(test)
    held_out_clips = video_records(test)
    if len(held_out) == 0:
        raise ValueError("the held-out split has no image sample; raise eval_samples or lower the video fraction")
    print(
        f"{len(train)} training samples, {len(test)} held-out samples ({len(held_out)} images and "
        f"{len(held_out_clips)} clips scored)"
    )

    work_dir = output_dir / "work"
    ablation = AblationRun(settings, train, held_out, work_dir, held_out_clips) if settings.ablation else None
    model, processor, main_run = train_and_evaluate(settings, train, held_out, True, work_dir, held_out_clips)
    print("\n== saving, reloading and predicting ==", flush=True)
    model_dir = output_dir / "model"
    round_trip = save_and_reload(model, processor, model_dir, held_out.select(range(min(4, len(held_out)))))
    print(f"saved to {model_dir}; reloaded model gives identical masks: {round_trip.identical} ({round_trip.message})")
    predictions = run_predictions(model_dir, test, output_dir)

    runs = [main_run]
    if ablation is not None:
        runs.append(ablation.result())
    wall_time = time.time() - started
    (output_dir / "cma_ablation.md").write_text(ablation_markdown(settings, runs, wall_time))

    results = {
        "settings": asdict(settings),
        "runs": [{**asdict(run), "margin": run.margin} for run in runs],
        "round_trip_identical": round_trip.identical,
        "round_trip": asdict(round_trip),
        "predictions": [{k: v for k, v in p.items() if k != "objects"} for p in predictions],
        "targets": {
            "ciou": TARGET_CIOU,
            "margin": TARGET_MARGIN,
            "ciou_met": main_run.ciou >= TARGET_CIOU,
            "margin_met": main_run.margin >= TARGET_MARGIN,
            **video_targets(main_run),
        },
        "wall_time_s": wall_time,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    written = sorted(entry.name for entry in output_dir.iterdir() if entry.name not in entries_before)
    folder.record(*[name for name in written if name != "maskcma_run.json" and not name.startswith(".")])
    _print_summary(runs, results, output_dir)
    if not round_trip.identical:
        raise RuntimeError(
            f"the save/reload check failed: {round_trip.message}; the saved folder {model_dir} does not reproduce "
            "the trained model"
        )
    return results


def video_targets(run: RunResult) -> dict:
    """Whether the propagated frames reach `TARGET_PROPAGATED_SHARE` × the key frames' J&F and `TARGET_MARGIN`
    above the shuffled-prompt control's propagated frames (`None` without held-out clips)."""
    video, shuffled = run.video or {}, run.shuffled_video or {}
    key, propagated = video.get("key_frames"), video.get("propagated_frames")
    control = shuffled.get("propagated_frames")
    share_met = margin_met = None
    if key is not None and propagated is not None:
        share_met = propagated["J&F"] >= TARGET_PROPAGATED_SHARE * key["J&F"]
        if control is not None:
            margin_met = propagated["J&F"] - control["J&F"] >= TARGET_MARGIN
    return {
        "propagated_share": TARGET_PROPAGATED_SHARE,
        "propagated_share_met": share_met,
        "propagated_margin_met": margin_met,
    }


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else "met" if flag else "MISSED"


def _print_summary(runs: list[RunResult], results: dict, output_dir: Path) -> None:
    main_run = runs[0]
    targets = results["targets"]
    print("\n== MaskCMA demo summary ==")
    print(
        f"held-out cIoU                 {main_run.ciou:.3f}   (target >= {TARGET_CIOU}: "
        f"{'met' if targets['ciou_met'] else 'MISSED'})"
    )
    print(
        f"shuffled-prompt control cIoU  {main_run.shuffled_ciou:.3f}   (margin {main_run.margin:+.3f}, target >= "
        f"{TARGET_MARGIN}: {'met' if targets['margin_met'] else 'MISSED'})"
    )
    for run in runs[1:]:
        print(f"CMA off: held-out cIoU {run.ciou:.3f}, shuffled {run.shuffled_ciou:.3f} (margin {run.margin:+.3f})")
        if run.video is not None:
            print(f"CMA off: {video_line(run.video, run.shuffled_video)}")
    print(f"Spearman(scores, true IoU)     {_number(main_run.score_iou_spearman)}   (held-out images)")
    if main_run.video is not None:
        video, shuffled = main_run.video, main_run.shuffled_video
        for kind in ("key_frames", "propagated_frames"):
            scores, control = video[kind], (shuffled or {}).get(kind)
            if scores is None:
                continue
            print(
                f"video {kind.replace('_', ' '):17s}  J&F {scores['J&F']:.3f} (J {scores['J']:.3f}, F "
                f"{scores['F']:.3f}); shuffled prompts J&F {_number(None if control is None else control['J&F'])}"
            )
        print(
            f"video propagated frames: J&F >= {TARGET_PROPAGATED_SHARE} x key frames: "
            f"{_met(targets.get('propagated_share_met'))}; >= {TARGET_MARGIN} above the shuffled control: "
            f"{_met(targets.get('propagated_margin_met'))}"
        )
        print(f"video frames with a mask where the target is present: {_number(video['nonempty_where_present'])}")
    print(f"save/load round trip identical: {results['round_trip_identical']}")
    print(f"wall time {results['wall_time_s']:.0f} s; results in {output_dir}")


# -- command ---------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train the tiny model on synthetic shapes, evaluate held-out cIoU and video J&F (key and propagated "
        "frames) vs a shuffled-prompt control, "
        "save, predict, and compare CMA on/off",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default="demo_output", help="output folder (default ./demo_output)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo in --output (removes only what it wrote)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not the targets")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each model")
    parser.add_argument("--train-samples", type=int, default=None, help="synthetic training samples")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples (images are scored)")
    parser.add_argument("--seed", type=int, default=None, help="seed of data, weights and training")
    parser.add_argument("--no-ablation", action="store_true", help="skip the use_cma=False run")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1; 0 keeps torch's default)"
    )
    parser.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    settings = QUICK_SETTINGS if args.quick else DemoSettings()
    overrides = {
        "steps": args.steps,
        "train_samples": args.train_samples,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "threads": args.threads,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_ablation:
        settings = replace(settings, ablation=False)
    if settings.threads < 0:
        print("maskcma demo: error: --threads must be >= 0", file=sys.stderr)
        return 2
    for name in ("steps", "train_samples", "eval_samples", "batch_size"):
        if getattr(settings, name) < 1:
            print(f"maskcma demo: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    run_demo(args.output, settings, overwrite=args.overwrite)
    return 0


__all__ = [
    "DemoSettings",
    "QUICK_SETTINGS",
    "RoundTripCheck",
    "RunResult",
    "compare_round_trip",
    "demo_command",
    "evaluate_referring",
    "register",
    "run_demo",
    "train_and_evaluate",
]
