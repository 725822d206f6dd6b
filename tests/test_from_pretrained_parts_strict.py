"""`MaskCMAModel.from_pretrained_parts` refuses VLM or SAM2 checkpoints with missing or unexpected weights."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.tiny import build_tiny_model


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    source, tokenizer = build_tiny_model(seed=7)
    source.vlm.save_pretrained(folder / "vlm")
    source.sam2.save_pretrained(folder / "sam2")
    return folder, tokenizer


def _edit(folder, edit):
    (path,) = folder.glob("*.safetensors")
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


def test_complete_parts_load(parts):
    folder, tokenizer = parts
    model = MaskCMAModel.from_pretrained_parts(folder / "vlm", folder / "sam2", tokenizer=tokenizer)
    assert model.config.seg_token_id == tokenizer.convert_tokens_to_ids("[SEG]")


def test_missing_sam2_weight_is_refused(parts, tmp_path):
    import shutil

    folder, tokenizer = parts
    shutil.copytree(folder / "sam2", tmp_path / "sam2")
    dropped = []

    def drop(weights):
        key = next(k for k in sorted(weights) if "mask_decoder" in k and k.endswith("weight"))
        dropped.append(key)
        del weights[key]

    _edit(tmp_path / "sam2", drop)
    with pytest.raises(ValueError, match=rf"SAM2 checkpoint .* missing keys \(1\): .*{dropped[0].split('.')[-2]}"):
        MaskCMAModel.from_pretrained_parts(folder / "vlm", tmp_path / "sam2", tokenizer=tokenizer)


def test_unexpected_vlm_weight_is_refused(parts, tmp_path):
    import shutil

    folder, tokenizer = parts
    shutil.copytree(folder / "vlm", tmp_path / "vlm")

    def add(weights):
        weights["model.language_model.extra_adapter.weight"] = torch.zeros(2, 2)

    _edit(tmp_path / "vlm", add)
    with pytest.raises(ValueError, match=r"VLM checkpoint .* unexpected keys \(1\): .*extra_adapter"):
        MaskCMAModel.from_pretrained_parts(tmp_path / "vlm", folder / "sam2", tokenizer=tokenizer)
