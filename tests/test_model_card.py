"""The model card: metrics JSONs of `maskcma evaluate` → model-index, offline metadata validation, card content."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from transformers_maskcma.hub_cards.model_card import (
    CardInputs,
    ModelCardValidationError,
    build_model_card,
    collect_benchmarks,
    extract_python_snippets,
    load_benchmark_results,
    parse_metrics_argument,
    validate_model_card,
)
from transformers_maskcma.tiny import tiny_config


def write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def metrics_files(tmp_path):
    """One image benchmark in the default `<dataset>-<split>` folder, one ReVOS file named explicitly, one video
    file carrying its own dataset/split keys (shapes of the metrics JSON of evaluation/runner.py)."""
    image = write_json(
        tmp_path / "eval" / "refcoco+-testA" / "metrics.json",
        {"kind": "image", "sources": ["refcoco+"], "n_samples": 20, "n_missing": 0,
         "metrics": {"gIoU": 0.80125, "cIoU": 0.7501}},
    )  # fmt: skip
    revos = write_json(
        tmp_path / "eval" / "run3" / "metrics.json",
        {"kind": "revos", "sources": ["revos"], "n_samples": 8, "metrics": {
            "referring": {"J": 0.5, "F": 0.6, "J&F": 0.55, "A": 0.91, "R": 0.25, "n_expressions": 5},
            "reasoning": {"J": 0.3, "F": 0.4, "J&F": 0.35, "A": 0.88, "R": 0.125, "n_expressions": 3},
            "overall": {"J": 0.4, "F": 0.5, "J&F": 0.45, "A": 0.895, "R": 0.1875, "n_expressions": 8}}},
    )  # fmt: skip
    video = write_json(
        tmp_path / "eval" / "x" / "m.json",
        {"kind": "video", "sources": ["mevis"], "dataset": "mevis", "split": "valid_u", "n_samples": 4,
         "metrics": {"J": 0.6, "F": 0.7, "J&F": 0.65, "n_expressions": 4}},
    )  # fmt: skip
    return image, revos, video


def test_metrics_files_are_read_with_their_benchmark_split(metrics_files):
    image, revos, video = metrics_files
    (refcoco,) = load_benchmark_results(image)
    assert (refcoco.dataset, refcoco.split, refcoco.kind) == ("refcoco+", "testA", "image")
    assert refcoco.metrics == {"gIoU": 0.80125, "cIoU": 0.7501} and refcoco.num_samples == 20
    path, dataset, split = parse_metrics_argument(f"revos:valid={revos}")
    assert (path, dataset, split) == (revos, "revos", "valid")
    subsets = load_benchmark_results(path, dataset, split)
    assert [s.subset for s in subsets] == ["overall", "referring", "reasoning"]
    assert subsets[2].metrics == {"J": 0.3, "F": 0.4, "J&F": 0.35, "A": 0.88, "R": 0.125}
    (mevis,) = load_benchmark_results(video)
    assert (mevis.dataset, mevis.split, mevis.display_name) == ("mevis", "valid_u", "MeViS")


def test_unusable_metrics_files_are_refused(tmp_path, metrics_files):
    _, revos, _ = metrics_files
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark_results(tmp_path / "none.json")
    with pytest.raises(ValueError, match="cannot tell which benchmark split.*e.g. revos:SPLIT="):
        load_benchmark_results(revos)
    no_gt = write_json(tmp_path / "mevis-valid" / "metrics.json",
                       {"kind": "video", "sources": ["mevis"], "metrics": None})  # fmt: skip
    with pytest.raises(ValueError, match="holds no metrics"):
        load_benchmark_results(no_gt)
    nan = write_json(tmp_path / "refcoco-val" / "metrics.json",
                     {"kind": "image", "sources": ["refcoco"], "metrics": {"cIoU": float("nan")}})  # fmt: skip
    with pytest.raises(ValueError, match="metrics.cIoU: expected a finite number"):
        load_benchmark_results(nan)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_benchmark_results(tmp_path / "bad.json")


def card_for(metrics_files, **config_overrides) -> ModelCard:
    image, revos, video = metrics_files
    benchmarks = collect_benchmarks([str(image), f"revos:valid={revos}", str(video)])
    inputs = CardInputs(
        model_name="maskcma-tiny",
        repo_id="alice/maskcma-tiny",
        base_models=["ByteDance/Sa2VA-1B", "facebook/sam2.1-hiera-large"],
        datasets=["lmms-lab/RefCOCO"],
        tags=["tiny"],
        benchmarks=benchmarks,
        training_recipe={"learning_rate": 4e-5, "lora": {"r": 128}},
        cma_gamma=0.125,
    )
    return build_model_card(tiny_config(**config_overrides), inputs)


def test_card_metadata_is_valid_and_the_model_index_carries_the_numbers(metrics_files):
    card = card_for(metrics_files)
    metadata = validate_model_card(str(card))
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-segmentation"
    assert metadata["license"] == "apache-2.0"
    assert metadata["base_model"] == ["ByteDance/Sa2VA-1B", "facebook/sam2.1-hiera-large"]
    assert metadata["datasets"] == ["lmms-lab/RefCOCO"]
    assert {"referring-segmentation", "sam2", "tiny"} <= set(metadata["tags"])
    # huggingface_hub's own parser reads the model-index back; values are percentages with two decimals
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "maskcma-tiny"
    values = {(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type): r.metric_value for r in results}
    assert values[("refcoco+", None, "testA", "cIoU")] == 75.01
    assert values[("refcoco+", None, "testA", "gIoU")] == 80.12  # 80.125 rounds half to even
    assert values[("revos", "reasoning", "valid", "R")] == 12.5
    assert values[("mevis", None, "valid_u", "J&F")] == 65.0
    assert len(results) == 2 + 3 * 5 + 3
    # the Hub reads the same file: the README round-trips through ModelCard
    assert ModelCard(str(card)).data.to_dict() == metadata


def test_card_body_states_the_cma_switches_recipe_and_usage(metrics_files):
    card = card_for(metrics_files, mask_source="conv", cma_topk_tokens=None, cma_config={"gate": "attention"})
    text = str(card)
    assert "| `mask_source` | `conv` |" in text
    assert "| `cma_topk_tokens` | null |" in text
    assert "| `cma_config.gate` | `attention` |" in text
    assert "| γ (`cma.gamma`, weight) | 0.125 | learned residual scale |" in text
    assert yaml.safe_load(text.split("```yaml\n")[1].split("```")[0]) == {"learning_rate": 4e-5, "lora": {"r": 128}}
    assert "| RefCOCO+ | testA | cIoU | 75.01 | 20 |" in text
    assert "## Limitations" in text
    snippets = extract_python_snippets(text)
    assert len(snippets) == 2
    assert 'model_id = "alice/maskcma-tiny"' in snippets[0] and "model.segment(**inputs" in snippets[0]
    assert 'pipeline("referring-segmentation", model="alice/maskcma-tiny"' in snippets[1]
    compile(snippets[0], "card-snippet", "exec")


def test_two_files_for_one_benchmark_split_are_refused(metrics_files):
    image, _, _ = metrics_files
    with pytest.raises(ValueError, match="two metrics files give numbers for RefCOCO\\+ split 'testA'"):
        build_model_card(tiny_config(), CardInputs("m", "a/m", benchmarks=collect_benchmarks([str(image)] * 2)))


def replace_front_matter(text: str, update) -> str:
    _, front, body = text.split("---\n", 2)
    metadata = yaml.safe_load(front)
    update(metadata)
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n" + body


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (lambda m: m.update(pipeline_tag="referring-segmentation"), "pipeline_tag: 'referring-segmentation' is not"),
        (lambda m: m.update(license="apache"), "license: 'apache' is not a Hub license"),
        (lambda m: m.update(license="other"), "'other' needs license_name and license_link"),
        (lambda m: m.update(base_model=["not a repo id"]), "base_model: 'not a repo id' is not a valid"),
        (lambda m: m["model-index"][0]["results"][0]["metrics"][0].update(value="high"), "'high' is not a number"),
        (lambda m: m["model-index"][0]["results"][0]["task"].update(type="segmentation"), "task type 'segmentation'"),
        (lambda m: m["model-index"][0]["results"][0]["dataset"].pop("type"), "cannot read the card's metadata"),
    ],
)
def test_validation_rejects_metadata_the_hub_would_refuse(metrics_files, update, message):
    text = replace_front_matter(str(card_for(metrics_files)), update)
    with pytest.raises(ModelCardValidationError, match=message):
        validate_model_card(text)


def test_card_without_front_matter_is_invalid():
    with pytest.raises(ModelCardValidationError, match="no YAML front matter"):
        validate_model_card("# just a title\n")
