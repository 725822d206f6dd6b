"""The README model card of an exported MaskCMA model.

`build_model_card` writes a `huggingface_hub.ModelCard`: YAML metadata (license, library, pipeline tag, tags, base
models, datasets, and a `model-index` filled from the metrics JSONs of `maskcma evaluate`), then the body: what the
model is, the values of the CMA switches and the learned residual scale γ, the training recipe, the evaluation
table, limitations, and a Python usage snippet.

Offline validation. `ModelCard.validate()` posts the card to the Hub's `/api/validate-yaml` and therefore needs the
network. `validate_model_card` checks the same things that the Hub's metadata schema checks for the fields this
module writes, without the network:

1. the front matter parses as a YAML mapping, and `ModelCard` parses it back (the `model-index` is read by
   huggingface_hub's own `model_index_to_eval_results`, which raises on a malformed index);
2. writing the parsed `ModelCardData` again (`eval_results_to_model_index`) gives back the same metadata, so nothing
   is lost or reinterpreted by huggingface_hub;
3. field values: `license` is a Hub license identifier (or `other` with `license_name` and `license_link`),
   `pipeline_tag` and every `model-index` task type are Hub pipeline tags, `base_model` and `datasets` entries are
   valid repository ids (`huggingface_hub.utils.validate_repo_id`), tags are non-empty strings, metric values are
   finite numbers.

The metrics JSON of `maskcma evaluate` (`evaluation/runner.py`) looks like::

    {"kind": "image" | "video" | "revos", "sources": ["refcoco"], "n_samples": 1500, "n_missing": 0,
     "counts": {"samples": 1500, "scored": 1500, "excluded": 0, "missing": 0},   # scored = samples in the means
     "fingerprint": {"model": {...}, ...},                                     # the run that made the predictions
     "metrics": {"gIoU": 0.81, "cIoU": 0.79}                                   # kind "image" (fractions)
              | {"J": ..., "F": ..., "J&F": ..., "n_expressions": ...}         # kind "video"
              | {"referring": {...}, "reasoning": {...}, "overall": {...}},    # kind "revos" (J, F, J&F, A, R)
     "dataset": "refcoco", "split": "val"}                                     # optional, see below

The benchmark and split come, in this order, from an explicit `DATASET:SPLIT=PATH` argument, from the JSON's
`dataset`/`split` keys (always written by `maskcma evaluate`), or, for older files without them, from a folder
named `<dataset>-<split>` (with `<dataset>` one of the JSON's `sources`). The sample count is `counts.scored`
(the samples in the means) when present, else `n_samples`. Values are stored in the card as percentages with two decimals, as
the benchmarks are reported in papers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = [
    "HUB_LICENSES",
    "HUB_PIPELINE_TAGS",
    "BenchmarkResult",
    "ModelCardValidationError",
    "build_model_card",
    "eval_results_from_benchmarks",
    "extract_python_snippets",
    "load_benchmark_results",
    "parse_metrics_argument",
    "validate_model_card",
]

# The pipeline tags of the Hub (huggingface.js `packages/tasks/src/pipelines.ts`), used to check `pipeline_tag` and
# the `model-index` task types offline.
HUB_PIPELINE_TAGS = frozenset(
    {
        "text-classification", "token-classification", "table-question-answering", "question-answering",
        "zero-shot-classification", "translation", "summarization", "feature-extraction", "text-generation",
        "fill-mask", "sentence-similarity", "text-to-speech", "text-to-audio", "automatic-speech-recognition",
        "audio-to-audio", "audio-classification", "audio-text-to-text", "voice-activity-detection",
        "depth-estimation", "image-classification", "object-detection", "image-segmentation", "text-to-image",
        "image-to-text", "image-to-image", "image-to-video", "unconditional-image-generation",
        "video-classification", "reinforcement-learning", "robotics", "tabular-classification",
        "tabular-regression", "tabular-to-text", "table-to-text", "multiple-choice", "text-ranking",
        "text-retrieval", "time-series-forecasting", "text-to-video", "image-text-to-text",
        "image-text-to-image", "image-text-to-video", "visual-question-answering", "document-question-answering",
        "zero-shot-image-classification", "graph-ml", "mask-generation", "zero-shot-object-detection",
        "text-to-3d", "image-to-3d", "image-feature-extraction", "video-text-to-text", "keypoint-detection",
        "visual-document-retrieval", "any-to-any", "video-to-video", "other",
    }
)  # fmt: skip

# License identifiers the Hub accepts in `license:` (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
        "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
        "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
        "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
        "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
        "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
        "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl",
        "lgpl-2.1", "lgpl-3.0", "isc", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl",
        "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql",
        "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license",
        "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "unknown", "other",
    }
)  # fmt: skip

PIPELINE_TAG = "image-segmentation"
LIBRARY_NAME = "transformers"
DEFAULT_TAGS = (
    "maskcma",
    "referring-segmentation",
    "reasoning-segmentation",
    "video-object-segmentation",
    "sam2",
    "sa2va",
    "multimodal",
    "custom_code",
)
# a Hub task id for every benchmark kind: the Hub has no video-segmentation task, so video benchmarks are listed
# under image-segmentation with a task name that says what they measure
_TASKS = {
    "image": ("image-segmentation", "Referring Image Segmentation"),
    "video": ("image-segmentation", "Referring Video Object Segmentation"),
    "revos": ("image-segmentation", "Reasoning Video Object Segmentation"),
}
DATASET_DISPLAY_NAMES = {
    "refcoco": "RefCOCO",
    "refcoco+": "RefCOCO+",
    "refcocog": "RefCOCOg",
    "mevis": "MeViS",
    "revos": "ReVOS",
    "ref_ytvos": "Ref-YouTube-VOS",
    "ref_davis": "Ref-DAVIS17",
    "synthetic": "Synthetic shapes",
}
_METRIC_ORDER = ("cIoU", "gIoU", "J&F", "J", "F", "A", "R")
_REVOS_SUBSETS = ("overall", "referring", "reasoning")
USAGE_HEADING = "## How to use"


class ModelCardValidationError(ValueError):
    """The card's metadata would be rejected by the Hub (the message lists every problem)."""


# --------------------------------------------------------------------------------------------------------------
# Metrics JSONs → benchmark results
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkResult:
    """The numbers of one benchmark split (one subset for ReVOS).

    Args:
        dataset (`str`): dataset name of `maskcma evaluate` (`refcoco`, `mevis`, ...).
        split (`str`): split name (`val`, `testA`, `valid_u`, ...).
        kind (`str`): `image`, `video` or `revos`.
        metrics (`dict[str, float]`): metric name → fraction in [0, 1] (`cIoU`, `gIoU`, `J`, `F`, `J&F`, `A`, `R`).
        subset (`str`, *optional*): ReVOS subset (`overall`, `referring`, `reasoning`).
        num_samples (`int`, *optional*): number of scored samples.
        source_file (`str`, *optional*): the metrics JSON it was read from.
    """

    dataset: str
    split: str
    kind: str
    metrics: dict[str, float]
    subset: str | None = None
    num_samples: int | None = None
    source_file: str | None = None

    @property
    def display_name(self) -> str:
        name = DATASET_DISPLAY_NAMES.get(self.dataset, self.dataset)
        return name if self.subset is None else f"{name} ({self.subset})"


def parse_metrics_argument(argument: str) -> tuple[Path, str | None, str | None]:
    """Read a `--metrics` value: `PATH`, or `DATASET:SPLIT=PATH` to name the benchmark explicitly.

    Returns:
        `(path, dataset or None, split or None)`.
    """
    match = re.fullmatch(r"(?P<dataset>[^:=/\\]+):(?P<split>[^:=/\\]+)=(?P<path>.+)", argument)
    if match:
        return Path(match.group("path")), match.group("dataset"), match.group("split")
    return Path(argument), None, None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _metric_values(values: Mapping[str, Any], where: str) -> dict[str, float]:
    metrics = {
        name: _number(value, f"{where}.{name}")
        for name, value in values.items()
        if name in _METRIC_ORDER and value is not None
    }
    if not metrics:
        raise ValueError(f"{where}: no metric among {list(_METRIC_ORDER)} (found keys {sorted(values)})")
    return metrics


def _benchmark_name(path: Path, payload: Mapping[str, Any], dataset: str | None, split: str | None):
    dataset = dataset or payload.get("dataset")
    split = split or payload.get("split")
    if dataset is None or split is None:
        folder = path.resolve().parent.name
        for source in payload.get("sources") or []:
            if isinstance(source, str) and folder.startswith(f"{source}-") and len(folder) > len(source) + 1:
                dataset = dataset or source
                split = split or folder[len(source) + 1 :]
                break
    if dataset is None or split is None:
        sources = [source for source in payload.get("sources") or [] if isinstance(source, str)]
        example = f"{dataset or (sources[0] if sources else 'refcoco')}:{split or 'SPLIT'}={path}"
        raise ValueError(
            f"{path}: cannot tell which benchmark split these metrics belong to: the JSON has no 'dataset'/'split' "
            f"keys and its folder {path.resolve().parent.name!r} is not '<dataset>-<split>' for its sources "
            f"{sources}; pass it as DATASET:SPLIT=PATH, e.g. {example}"
        )
    return str(dataset), str(split)


def load_benchmark_results(
    path: str | Path, dataset: str | None = None, split: str | None = None
) -> list[BenchmarkResult]:
    """Read one metrics JSON of `maskcma evaluate` (format in the module docstring).

    Returns:
        One `BenchmarkResult` (image and video benchmarks) or one per ReVOS subset with numbers.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON, no metrics (a split without ground truth), unknown kind, or the benchmark split
            cannot be told (see `parse_metrics_argument`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"metrics file {path} does not exist; write it with `maskcma evaluate ... --output {path}`"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); pass the metrics.json written by `maskcma evaluate`"
        ) from error
    if not isinstance(payload, Mapping) or "metrics" not in payload or "kind" not in payload:
        raise ValueError(
            f"{path} is not a metrics JSON of `maskcma evaluate`: expected an object with 'kind' and 'metrics' keys"
        )
    kind = payload["kind"]
    if kind not in _TASKS:
        raise ValueError(f"{path}: unknown benchmark kind {kind!r}; expected one of {sorted(_TASKS)}")
    metrics = payload["metrics"]
    if metrics is None:
        raise ValueError(
            f"{path} holds no metrics (the split has no public ground truth): its numbers come from the evaluation "
            "server; write them into a JSON with 'kind', 'metrics', 'dataset' and 'split' to put them in the card"
        )
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{path}: 'metrics' must be an object, got {type(metrics).__name__}")
    dataset, split = _benchmark_name(path, payload, dataset, split)
    counts = payload.get("counts")
    num_samples = counts.get("scored") if isinstance(counts, Mapping) else payload.get("n_samples")
    common = {"dataset": dataset, "split": split, "kind": kind, "source_file": str(path), "num_samples": num_samples}
    if kind != "revos":
        return [BenchmarkResult(metrics=_metric_values(metrics, f"{path}: metrics"), **common)]
    results = []
    for subset in _REVOS_SUBSETS:
        values = metrics.get(subset)
        if values is not None:
            results.append(
                BenchmarkResult(metrics=_metric_values(values, f"{path}: metrics.{subset}"), subset=subset, **common)
            )
    if not results:
        raise ValueError(f"{path}: the ReVOS metrics have no subset with numbers ({list(_REVOS_SUBSETS)} are all null)")
    return results


def _percent(value: float) -> float:
    return round(100.0 * value, 2)


def eval_results_from_benchmarks(results: Sequence[BenchmarkResult]) -> list[EvalResult]:
    """One huggingface_hub `EvalResult` per (benchmark, metric), values in percent."""
    eval_results = []
    seen = set()
    for result in results:
        key = (result.dataset, result.split, result.subset)
        if key in seen:
            raise ValueError(
                f"two metrics files give numbers for {result.display_name} split {result.split!r} "
                f"(the second is {result.source_file}); pass each benchmark split once"
            )
        seen.add(key)
        task_type, task_name = _TASKS[result.kind]
        for metric in _METRIC_ORDER:
            if metric not in result.metrics:
                continue
            eval_results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=result.dataset,
                    dataset_name=DATASET_DISPLAY_NAMES.get(result.dataset, result.dataset),
                    dataset_config=result.subset,
                    dataset_split=result.split,
                    metric_type=metric,
                    metric_name=f"{metric} (%)",
                    metric_value=_percent(result.metrics[metric]),
                )
            )
    return eval_results


# --------------------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CardInputs:
    """What the card says beyond the model config (see `build_model_card`)."""

    model_name: str
    repo_id: str
    license: str = "apache-2.0"
    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    language: list[str] = field(default_factory=lambda: ["en"])
    benchmarks: list[BenchmarkResult] = field(default_factory=list)
    training_recipe: Mapping[str, Any] | None = None
    cma_gamma: float | None = None
    license_name: str | None = None
    license_link: str | None = None
    notes: list[str] = field(default_factory=list)
    space_id: str | None = None
    example_overlays: list[ExampleOverlay] = field(default_factory=list)


@dataclass(frozen=True)
class ExampleOverlay:
    """An overlay image stored in the exported folder (`path`, relative), with the prompt and answer that made it."""

    path: str
    prompt: str
    answer: str


_SWITCH_DOCS = (
    ("use_cma", "CMA on (`False` = plain Sa2VA: one decoder pass)"),
    ("mask_source", "where the mask prior comes from (`pred`: first decoder pass; `conv`: 1×1 conv head; `gt`)"),
    ("cma_config.direction", "queries/keys of the attention"),
    ("cma_topk_tokens", "text tokens kept by the router (`null` = all)"),
    ("cma_config.gate", "how the prior gates the attention (`output` or `attention`)"),
    ("cma_config.warmup_target", "what the warm-up scales (`residual` γ or the `mask` gate)"),
    ("warmup_ratio", "fraction of training steps of the warm-up"),
    ("cma_config.num_heads", "attention heads on the 256-d SAM2 embedding"),
    ("cma_on_propagation", "CMA also on frames produced by SAM2 memory propagation"),
    ("tmc_weight", "weight of the text–mask contrastive loss"),
    ("tmc_temperature", "temperature of the contrastive loss"),
    ("prior_loss_weight", "weight of the mask loss on the prior"),
    ("bce_loss_weight", "mask BCE weight"),
    ("dice_loss_weight", "mask Dice weight"),
    ("iou_loss_weight", "weight of SAM2's IoU-head loss (L1 to each candidate mask's actual IoU)"),
    ("object_score_loss_weight", "weight of SAM2's object-score loss (BCE, object present or not)"),
    ("object_presence", "mask where SAM2's object score is <= 0: `keep` (Sa2VA) or `blank` (SAM2)"),
)

# facts of the research recipe this package reproduces (docs/training.md, `maskcma train`)
REFERENCE_RECIPE = {
    "optimizer": "AdamW, lr 4e-5, weight decay 0.05, gradient clipping 1.0",
    "schedule": "cosine, 5% linear LR warm-up, 1 epoch",
    "precision": "bf16",
    "lora": "r=128, alpha=256, dropout 0.05 on q/k/v/o and MLP projections of the LLM",
    "trained": "SAM2 mask decoder, seg_proj, text_proj, CMA, LoRA, embeddings and LM-head rows of new tokens",
    "frozen": "SAM2 image encoder and memory modules, VLM vision tower",
    "losses": "LM next-token + 2.0·BCE + 0.5·Dice on 256×256 mask logits + tmc_weight·TMC (this package adds SAM2's "
    "IoU-head and object-score losses, weight 1 each)",
}


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else f"`{value}`"


def _switch_table(config: Any, gamma: float | None) -> str:
    lines = ["| config field | value | meaning |", "|---|---|---|"]
    for name, meaning in _SWITCH_DOCS:
        value = config
        for part in name.split("."):  # `cma_config.gate`: a field of the CMA sub-config
            value = getattr(value, part)
        lines.append(f"| `{name}` | {_yaml_value(value)} | {meaning} |")
    if gamma is not None:
        state = "CMA inactive: the masks equal the plain Sa2VA path" if gamma == 0.0 else "learned residual scale"
        lines.append(f"| γ (`cma.gamma`, weight) | {gamma:.6g} | {state} |")
    return "\n".join(lines)


def _results_table(benchmarks: Sequence[BenchmarkResult]) -> str:
    if not benchmarks:
        return (
            "No evaluation results were given to `maskcma export` (`--metrics`); evaluate with `maskcma evaluate` "
            "and re-export to fill this section and the `model-index`."
        )
    lines = ["| benchmark | split | metric | value (%) | samples |", "|---|---|---|---|---|"]
    for result in benchmarks:
        for metric in _METRIC_ORDER:
            if metric in result.metrics:
                samples = "" if result.num_samples is None else str(result.num_samples)
                lines.append(
                    f"| {result.display_name} | {result.split} | {metric} | {_percent(result.metrics[metric]):.2f} "
                    f"| {samples} |"
                )
    return "\n".join(lines)


def _recipe_section(recipe: Mapping[str, Any] | None) -> str:
    reference = "\n".join(f"- **{name}**: {value}" for name, value in REFERENCE_RECIPE.items())
    if recipe is None:
        return (
            "This export does not record its training configuration (pass `--training-config` to "
            "`maskcma export`). The research recipe that `maskcma train` reproduces is:\n\n" + reference
        )
    dumped = yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True).strip()
    return (
        "Training configuration given to `maskcma export`:\n\n```yaml\n" + dumped + "\n```\n\n"
        "For reference, the research recipe that `maskcma train` reproduces by default:\n\n" + reference
    )


def usage_snippet(repo_id: str) -> str:
    """The Python usage example of the card (runs against any exported folder or Hub repo)."""
    return f'''```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model_id = "{repo_id}"
model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

image = Image.open("example.jpg").convert("RGB")
inputs = processor(images=image, text="Please segment the red circle.", return_tensors="pt")
with torch.no_grad():
    output = model.segment(**inputs, max_new_tokens=16)
print(processor.decode_answers(output.answer_ids)[0])
masks = output.masks[0]  # (num_objects, height, width) bool, one mask per [SEG] in the answer
print(tuple(masks.shape), output.scores[0].tolist())
```'''


def pipeline_snippet(repo_id: str) -> str:
    return f'''```python
from transformers import pipeline

segmenter = pipeline("referring-segmentation", model="{repo_id}", trust_remote_code=True)
result = segmenter("example.jpg", text="Please segment the red circle.")
```'''


def _demo_section(inputs: CardInputs) -> str:
    """`## Demo`: the Space link and the example overlays made at export; empty when there is neither."""
    if inputs.space_id is None and not inputs.example_overlays:
        return ""
    lines = ["## Demo", ""]
    if inputs.space_id is not None:
        link = f"[{inputs.space_id}](https://huggingface.co/spaces/{inputs.space_id})"
        lines.append(
            f"Try the model in its web demo, the Space {link}: "
            "an image or a video and a prompt in, the answer, overlay, masks and scores out, and a view of what the "
            "CMA changes (CMA on vs. off)."
        )
        lines.append("")
    if inputs.example_overlays:
        lines.append("Outputs of this model on the demo's example inputs, made at export:")
        lines.append("")
        lines.append("| prompt | answer | overlay |")
        lines.append("|---|---|---|")
        for example in inputs.example_overlays:
            answer = example.answer.replace("|", "\\|")
            lines.append(f"| {example.prompt} | {answer} | ![overlay]({example.path}) |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _body(config: Any, inputs: CardInputs) -> str:
    uses_cma = bool(config.use_cma)
    vlm_type = getattr(config.vlm_config, "model_type", "?")
    sam2_size = getattr(config.sam2_config, "image_size", "?")
    notes = "".join(f"\n- {note}" for note in inputs.notes)
    return f"""
# {inputs.model_name}

A referring segmentation model for images and videos in the Sa2VA family, with Mask-guided Cross-Modal Attention
(CMA): a multimodal LLM ({vlm_type}) answers with `[SEG]` tokens, SAM2 ({sam2_size}×{sam2_size} input) decodes each
`[SEG]` into a mask, and between two SAM2 decoder passes the CMA lets SAM2's image embedding attend to the prompt's
text tokens, gated by the first-pass mask prior. Loading needs `trust_remote_code=True`: the modeling code is stored
beside the weights.{notes}

## CMA switches

The defaults reproduce the research code; the paper's variants are config values. Values of this model:

{_switch_table(config, inputs.cma_gamma)}

CMA is {"on" if uses_cma else "off (plain Sa2VA decoding)"}.

{_demo_section(inputs)}
{USAGE_HEADING}

{usage_snippet(inputs.repo_id)}

The custom pipeline stored in the repository does the same in one call:

{pipeline_snippet(inputs.repo_id)}

Videos: pass `videos=[frame, ...]` (PIL images or arrays) to the processor; `output.masks[0]` is then
`(num_objects, num_frames, height, width)`.

## Training

{_recipe_section(inputs.training_recipe)}

## Evaluation

{_results_table(inputs.benchmarks)}

Image benchmarks: gIoU = mean over expressions of I/U, cIoU = ΣI/ΣU. Video benchmarks: J (region IoU), F (boundary
F-measure) and J&F averaged over expressions; ReVOS adds A (pixel accuracy) and R (robustness).

## Limitations

- Prompts are English; answers follow the chat template of the tokenizer shipped here.
- Masks are predicted at 256×256 and upsampled to the image size, so thin structures lose detail.
- For videos the LLM only sees a few key frames; the other frames come from SAM2's memory propagation, which can
  drift on long clips or when the object leaves and re-enters the frame.
- The model segments what the prompt names even when it is absent in rare cases; check `output.scores`.
- Benchmark numbers above are those of the metrics files given at export; they are not re-computed here.
"""


def build_model_card(config: Any, inputs: CardInputs) -> ModelCard:
    """Write the model card of an exported model.

    Args:
        config (`MaskCMAConfig`): the exported model's config (CMA switch values, sub-model types).
        inputs (`CardInputs`): names, license, base models, datasets, benchmark results, training recipe, γ.

    Returns:
        `huggingface_hub.ModelCard` whose metadata passes `validate_model_card`.
    """
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *inputs.tags]))
    eval_results = eval_results_from_benchmarks(inputs.benchmarks) or None
    card_data = ModelCardData(
        language=inputs.language or None,
        license=inputs.license,
        license_name=inputs.license_name,
        license_link=inputs.license_link,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        base_model=list(inputs.base_models) or None,
        datasets=list(inputs.datasets) or None,
        metrics=sorted({result.metric_type for result in eval_results}) if eval_results else None,
        model_name=inputs.model_name,
        eval_results=eval_results,
    )
    content = f"---\n{card_data.to_yaml()}\n---\n{_body(config, inputs)}"
    card = ModelCard(content)
    validate_model_card(card)
    return card


# --------------------------------------------------------------------------------------------------------------
# Offline validation
# --------------------------------------------------------------------------------------------------------------


def _front_matter(text: str) -> Mapping[str, Any]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        raise ModelCardValidationError("the card has no YAML front matter (a block between '---' lines at the top)")
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise ModelCardValidationError(f"the card's YAML front matter does not parse: {error}") from error
    if not isinstance(metadata, Mapping):
        raise ModelCardValidationError(f"the card's YAML front matter must be a mapping, got {type(metadata).__name__}")
    return metadata


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_repo_ids(field_name: str, value: Any, problems: list[str]) -> None:
    for entry in _as_list(value):
        if not isinstance(entry, str):
            problems.append(f"{field_name}: {entry!r} is not a string")
            continue
        try:
            validate_repo_id(entry)
        except HFValidationError as error:
            problems.append(f"{field_name}: {entry!r} is not a valid Hub repository id ({error})")


def _check_metadata_fields(metadata: Mapping[str, Any], problems: list[str]) -> None:
    license_id = metadata.get("license")
    if license_id is not None and license_id not in HUB_LICENSES:
        problems.append(f"license: {license_id!r} is not a Hub license identifier (use 'other' with license_name/link)")
    if license_id == "other" and not (metadata.get("license_name") and metadata.get("license_link")):
        problems.append("license: 'other' needs license_name and license_link")
    pipeline_tag = metadata.get("pipeline_tag")
    if pipeline_tag is not None and pipeline_tag not in HUB_PIPELINE_TAGS:
        problems.append(f"pipeline_tag: {pipeline_tag!r} is not a Hub pipeline tag")
    library_name = metadata.get("library_name")
    if library_name is not None and (not isinstance(library_name, str) or not library_name):
        problems.append(f"library_name: {library_name!r} must be a non-empty string")
    for tag in _as_list(metadata.get("tags")):
        if not isinstance(tag, str) or not tag.strip():
            problems.append(f"tags: {tag!r} must be a non-empty string")
    _check_repo_ids("base_model", metadata.get("base_model"), problems)
    _check_repo_ids("datasets", metadata.get("datasets"), problems)


def _check_model_index(model_index: Any, problems: list[str]) -> None:
    if not isinstance(model_index, list) or not model_index:
        problems.append("model-index: must be a non-empty list")
        return
    try:
        name, results = model_index_to_eval_results(model_index)
    except (KeyError, TypeError, ValueError) as error:
        problems.append(f"model-index: huggingface_hub cannot parse it ({type(error).__name__}: {error})")
        return
    if not isinstance(name, str) or not name:
        problems.append("model-index: the model name must be a non-empty string")
    for result in results:
        where = f"model-index: {result.dataset_name} {result.dataset_split} {result.metric_type}"
        if result.task_type not in HUB_PIPELINE_TAGS:
            problems.append(f"{where}: task type {result.task_type!r} is not a Hub task id")
        if isinstance(result.metric_value, bool) or not isinstance(result.metric_value, (int, float)):
            problems.append(f"{where}: value {result.metric_value!r} is not a number")
        elif not math.isfinite(float(result.metric_value)):
            problems.append(f"{where}: value {result.metric_value!r} is not finite")
    rewritten = eval_results_to_model_index(name, results)
    if rewritten != model_index:
        problems.append("model-index: huggingface_hub does not write it back identically (fields lost or reordered)")


def validate_model_card(card: ModelCard | str) -> dict[str, Any]:
    """Check the card's metadata offline (see the module docstring for what is checked).

    Args:
        card: a `ModelCard` or the README text.

    Returns:
        The parsed metadata (`dict`).

    Raises:
        ModelCardValidationError: listing every problem found.
    """
    text = str(card)
    metadata = dict(_front_matter(text))
    problems: list[str] = []
    try:
        parsed = ModelCard(text)
    except ValueError as error:
        raise ModelCardValidationError(f"huggingface_hub cannot read the card's metadata: {error}") from error
    round_trip = parsed.data.to_dict()
    if round_trip != metadata:
        differing = sorted(key for key in set(round_trip) | set(metadata) if round_trip.get(key) != metadata.get(key))
        problems.append(f"ModelCardData does not reproduce the metadata for fields {differing}")
    _check_metadata_fields(metadata, problems)
    if "model-index" in metadata:
        _check_model_index(metadata["model-index"], problems)
    if problems:
        raise ModelCardValidationError("invalid model card metadata:\n- " + "\n- ".join(problems))
    return metadata


def extract_python_snippets(text: str, heading: str | None = USAGE_HEADING) -> list[str]:
    """The ```python blocks of a card (only those under `heading` up to the next `## ` heading, when given)."""
    if heading is not None:
        start = text.find(heading)
        if start < 0:
            return []
        end = text.find("\n## ", start + len(heading))
        text = text[start : end if end >= 0 else len(text)]
    return [block.strip("\n") for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)]


def collect_benchmarks(arguments: Iterable[str]) -> list[BenchmarkResult]:
    """Read every `--metrics` argument (`PATH` or `DATASET:SPLIT=PATH`)."""
    benchmarks: list[BenchmarkResult] = []
    for argument in arguments:
        path, dataset, split = parse_metrics_argument(argument)
        benchmarks.extend(load_benchmark_results(path, dataset=dataset, split=split))
    return benchmarks
