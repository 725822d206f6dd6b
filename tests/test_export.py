"""`maskcma export`: a Hub-ready folder that loads without the package, gives the trained model's masks, and holds
every weight (strict); LoRA adapter folders are merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from transformers_maskcma.cli import main
from transformers_maskcma.hub_cards.export import ExportError, export_model
from transformers_maskcma.hub_cards.model_card import validate_model_card
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor
from transformers_maskcma.trainer.lora import apply_lora, default_lora_config, merge_lora

PROMPT = "Please segment the red circle."
ANSWER = "It is [SEG] and [SEG]."


def perturb_(model: torch.nn.Module, seed: int, only_trainable: bool = False) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad or not only_trainable:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """An image file and two object masks."""
    folder = tmp_path_factory.mktemp("sample")
    generator = np.random.default_rng(4)
    image = (generator.random((48, 60, 3)) * 255).astype(np.uint8)
    masks = generator.random((2, 48, 60)) > 0.5
    Image.fromarray(image).save(folder / "example.jpg")
    np.save(folder / "masks.npy", masks)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 'trained' tiny model: every weight moved, γ ≠ 0 so the CMA changes the masks; saved with its processor."""
    model, tokenizer = build_tiny_model(seed=21)
    perturb_(model, seed=2)
    with torch.no_grad():
        model.cma.gamma.fill_(0.75)
    model.eval()
    folder = tmp_path_factory.mktemp("trained") / "maskcma-tiny"
    model.save_pretrained(folder)
    build_tiny_processor(tokenizer).save_pretrained(folder)
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "refcoco-val" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"kind": "image", "sources": ["refcoco"], "n_samples": 3, "n_missing": 0,
                                "metrics": {"gIoU": 0.625, "cIoU": 0.5}}))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def exported(trained, metrics_file, tmp_path_factory):
    _, _, folder = trained
    output = tmp_path_factory.mktemp("export") / "maskcma-tiny"
    code = main(["export", "--model", str(folder), "--output", str(output), "--max-shard-size", "2MB",
                 "--metrics", str(metrics_file), "--base-model", "ByteDance/Sa2VA-1B", "--dataset", "lmms-lab/RefCOCO",
                 "--repo-id", "alice/maskcma-tiny"])  # fmt: skip
    assert code == 0
    return output


def package_forward(model: MaskCMAModel, tokenizer, sample: Path) -> dict:
    processor = build_tiny_processor(tokenizer)
    masks = list(np.load(sample / "masks.npy"))
    inputs = processor(images=str(sample / "example.jpg"), text=PROMPT, answer=ANSWER, masks=masks)
    with torch.no_grad():
        output = model(**inputs)
    return {"input_ids": inputs["input_ids"], "pred_masks": output.pred_masks, "iou_scores": output.iou_scores}


def test_export_folder_layout(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_maskcma.MaskCMAConfig",
        "AutoModel": "modeling_maskcma.MaskCMAModel",
        "AutoProcessor": "processing_maskcma.MaskCMAProcessor",
    }
    assert config["custom_pipelines"]["referring-segmentation"] == {
        "impl": "pipeline.ReferringSegmentationPipeline", "pt": ["AutoModel"], "tf": [], "type": "multimodal",
    }  # fmt: skip
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((exported / shard).is_file() for shard in shards)
    for shard in shards:  # every listed tensor is in its shard
        with safe_open(exported / shard, "pt") as handle:
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(handle.keys())
    for name in (
        "modeling_maskcma.py",
        "configuration_maskcma.py",
        "cma.py",
        "processing_maskcma.py",
        "image_io.py",
        "pipeline.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "README.md",
    ):
        assert (exported / name).is_file(), name  # fmt: skip
    processor_config = json.loads((exported / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_maskcma.MaskCMAProcessor"


def test_card_of_the_export_is_valid(exported):
    metadata = validate_model_card((exported / "README.md").read_text())
    assert metadata["base_model"] == ["ByteDance/Sa2VA-1B"] and metadata["datasets"] == ["lmms-lab/RefCOCO"]
    values = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert values == {"cIoU": 50.0, "gIoU": 62.5}
    assert "| γ (`cma.gamma`, weight) | 0.75 |" in (exported / "README.md").read_text()


FRESH_PROCESS = textwrap.dedent(
    """
    import re, sys
    sys.modules["transformers_maskcma"] = None  # the package cannot be imported: only the folder's code runs
    import numpy as np, torch
    from PIL import Image
    torch.set_num_threads(1)  # as in the test process, so both compute in the same order
    from transformers import AutoModel, AutoProcessor

    export, sample, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
    masks = list(np.load(sample + "/masks.npy"))
    inputs = processor(images=sample + "/example.jpg", text=sys.argv[4], answer=sys.argv[5], masks=masks)
    with torch.no_grad():
        output = model(**inputs)
    torch.save({"input_ids": inputs["input_ids"], "pred_masks": output.pred_masks,
                "iou_scores": output.iou_scores}, out)

    # the usage code of the model card, as written, against the exported folder
    text = open(export + "/README.md").read()
    start = text.index("## How to use")
    section = text[start:text.index("\\n## ", start + 1)]
    for block in re.findall(r"```python\\n(.*?)```", section, flags=re.S):
        exec(compile(block.replace("alice/maskcma-tiny", export), "card-snippet", "exec"), {})
    """
)


def test_export_loads_without_the_package_and_gives_the_trained_masks(exported, trained, sample, tmp_path):
    model, tokenizer, _ = trained
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    result_file = tmp_path / "result.pt"
    (tmp_path / "example.jpg").write_bytes((sample / "example.jpg").read_bytes())  # the card reads example.jpg
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run(
        [sys.executable, str(script), str(exported), str(sample), str(result_file), PROMPT, ANSWER],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    fresh = torch.load(result_file)
    expected = package_forward(model, tokenizer, sample)
    assert torch.equal(fresh["input_ids"], expected["input_ids"])
    assert fresh["pred_masks"].shape == (2, 32, 32)
    assert torch.equal(fresh["pred_masks"], expected["pred_masks"])
    assert torch.equal(fresh["iou_scores"], expected["iou_scores"])
    # the snippet printed the answer, then the mask shape (objects, 48, 60) and the scores
    lines = completed.stdout.splitlines()
    with torch.no_grad():
        inputs = build_tiny_processor(tokenizer)(images=str(sample / "example.jpg"), text=PROMPT)
        segmented = model.segment(**inputs, max_new_tokens=16)
    assert lines[0] == build_tiny_processor(tokenizer).decode_answers(segmented.answer_ids)[0]
    assert lines[1] == f"{tuple(segmented.masks[0].shape)} {segmented.scores[0].tolist()}"


def test_lora_adapter_folder_is_merged_on_export(tmp_path, sample):
    base, tokenizer = build_tiny_model(seed=8)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = apply_lora(MaskCMAModel.from_pretrained(base_dir), default_lora_config(base, r=4, lora_alpha=8))
    perturb_(peft_model, seed=3, only_trainable=True)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    expected = package_forward(merge_lora(peft_model).eval(), tokenizer, sample)

    result = export_model(adapter_dir, tmp_path / "export", max_shard_size="50MB")
    assert result.merged_lora and result.verified
    assert "LoRA adapters were merged" in (tmp_path / "export" / "README.md").read_text()
    exported = MaskCMAModel.from_pretrained(tmp_path / "export").eval()
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in exported.named_parameters())
    got = package_forward(exported, tokenizer, sample)
    torch.testing.assert_close(got["pred_masks"], expected["pred_masks"], rtol=1e-4, atol=1e-5)
    untrained = package_forward(base.eval(), tokenizer, sample)
    assert (got["pred_masks"] - untrained["pred_masks"]).abs().max() > 1e-3  # the adapters were folded in


def test_export_errors_leave_nothing_half_written(trained, tmp_path, exported, capsys):
    _, _, folder = trained
    with pytest.raises(FileNotFoundError, match="metrics file .* does not exist"):
        export_model(folder, tmp_path / "out", metrics=[str(tmp_path / "missing.json")])
    assert not (tmp_path / "out").exists()
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="neither a saved MaskCMA model"):
        export_model(tmp_path / "not_a_model", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="trained model .* does not exist"):
        export_model(tmp_path / "absent", tmp_path / "out")
    assert main(["export", "--model", str(folder), "--output", str(exported)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err


@pytest.fixture()
def adapter_run(tmp_path):
    """A base MaskCMA folder and a LoRA adapter folder trained on it (every trainable tensor moved)."""
    base, tokenizer = build_tiny_model(seed=8)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = apply_lora(MaskCMAModel.from_pretrained(base_dir), default_lora_config(base, r=4, lora_alpha=8))
    perturb_(peft_model, seed=3, only_trainable=True)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


CMA_ADAPTER_KEY = "base_model.model.cma.router.query_proj.weight"


def test_export_loads_adapters_strictly(adapter_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from transformers_maskcma.trainer.lora import AdapterLoadError

    _, adapter_dir = adapter_run
    weights_path = adapter_dir / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    assert CMA_ADAPTER_KEY in weights
    del weights[CMA_ADAPTER_KEY]  # the CMA's modules_to_save copy lost
    save_file(weights, str(weights_path))
    with pytest.raises(AdapterLoadError, match=f"missing keys {CMA_ADAPTER_KEY}"):
        export_model(adapter_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_verify_export_compares_with_the_adapter_loaded_from_disk(adapter_run, tmp_path, monkeypatch):
    """A weight dropped between loading and writing (here: the merged CMA falls back to the base model's CMA, as if
    its modules_to_save copy were lost) passes a comparison with the in-memory model, but not with the adapter
    loaded afresh from disk."""
    from transformers_maskcma.hub_cards import export as export_module

    base_dir, adapter_dir = adapter_run
    real_load = export_module.load_trained_model
    calls = []

    def load_dropping_the_cma_copy(path, base_model=None, dtype=None):
        model, files_dir, merged = real_load(path, base_model=base_model, dtype=dtype)
        calls.append(path)
        if len(calls) == 1:  # the model that gets written
            base_cma = MaskCMAModel.from_pretrained(base_dir).cma.state_dict()
            model.cma.load_state_dict(base_cma)
        return model, files_dir, merged

    monkeypatch.setattr(export_module, "load_trained_model", load_dropping_the_cma_copy)
    with pytest.raises(ValueError, match=r"differs from .* in \d+ weight\(s\): \[.cma\."):
        export_model(adapter_dir, tmp_path / "export")
    assert len(calls) == 2


def test_truncated_weights_shard_is_named(trained, tmp_path, capsys):
    import shutil

    _, _, folder = trained
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert main(["export", "--model", str(copy), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"weights file {shard} is truncated" in err
