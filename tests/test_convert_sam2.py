"""`maskcma convert sam2`: official SAM2 `.pt` → transformers Sam2Model / Sam2VideoModel.

The reference is the official `sam2` package (installed by `make setup` as a test-only dependency): a tiny SAM2.1
(Hiera width 32, 5 blocks, 256×256 input) is built from the official tiny YAML with hydra, every parameter is
perturbed so that no tensor keeps a trivial (zero / one) initialisation, and it is saved as `{"model": state_dict}`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import sam2
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import Sam2Config, Sam2Model, Sam2VideoModel

from transformers_maskcma.hub_cards import convert_commands
from transformers_maskcma.hub_cards.convert_sam2 import (
    CONVERSION_REPORT_NAME,
    IMAGE_MODEL_DROPPED_PREFIXES,
    SAM2_SIZE_PRESETS,
    Sam2ConversionError,
    build_sam2_model,
    convert_sam2_checkpoint,
    infer_sam2_size,
    load_sam2_checkpoint,
    sam2_architecture_for_size,
    sam2_architecture_from_official_config,
    sam2_config_from_architecture,
)

IMAGE_SIZE = 256
OFFICIAL_CONFIG_DIR = Path(os.path.dirname(sam2.__file__)) / "configs"
SIZE_FILES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
IMAGE_MODEL_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.")


def cli_main(argv: list[str]) -> int:
    """`maskcma ...` with the `convert` command mounted the way cli.py mounts an area's `register`."""
    parser = argparse.ArgumentParser(prog="maskcma")
    convert_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def official_yaml(size: str, generation: str = "sam2.1") -> Path:
    return OFFICIAL_CONFIG_DIR / generation / f"{generation}_hiera_{SIZE_FILES[size]}.yaml"


def tiny_official_config() -> dict:
    """The official SAM2.1 tiny config, shrunk: Hiera width 32 with stages (1, 1, 2, 1), 256×256 input."""
    model = OmegaConf.to_container(OmegaConf.load(official_yaml("tiny")))["model"]
    model["image_encoder"]["trunk"].update(
        embed_dim=32,
        num_heads=1,
        stages=[1, 1, 2, 1],
        global_att_blocks=[3],
        window_pos_embed_bkg_spatial_size=[4, 4],
        window_spec=[8, 4, 8, 4],
    )
    model["image_encoder"]["neck"]["backbone_channel_list"] = [256, 128, 64, 32]
    model["image_size"] = IMAGE_SIZE
    model["memory_attention"]["num_layers"] = 2
    for attention in ("self_attention", "cross_attention"):
        model["memory_attention"]["layer"][attention]["feat_sizes"] = [IMAGE_SIZE // 16, IMAGE_SIZE // 16]
    model["memory_encoder"]["fuser"]["num_layers"] = 1
    # what the official build_sam2(apply_postprocessing=True) adds
    model["sam_mask_decoder_extra_args"] = {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    }
    return {"model": model}


def perturb_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(official model in eval mode, config dict, path of its YAML, path of its `.pt`)."""
    folder = tmp_path_factory.mktemp("tiny_sam2")
    config = tiny_official_config()
    torch.manual_seed(0)
    official = instantiate(OmegaConf.create(config).model, _recursive_=True).eval()
    perturb_(official, seed=1)
    checkpoint = folder / "tiny_sam2.pt"
    torch.save({"model": official.state_dict()}, checkpoint)
    config_file = folder / "tiny_sam2.yaml"
    OmegaConf.save(OmegaConf.create(config), config_file)
    return official, config, config_file, checkpoint


@pytest.fixture(scope="module")
def converted_dir(tiny, tmp_path_factory):
    _, _, config_file, checkpoint = tiny
    return convert_sam2_checkpoint(checkpoint, tmp_path_factory.mktemp("converted") / "sam2", config=config_file)


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


def official_image_embeddings(official, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The official SAM2ImagePredictor.set_image path on an already normalised tensor: 3 levels, high → low res."""
    backbone_out = official.forward_image(pixel_values)
    _, features, _, sizes = official._prepare_backbone_features(backbone_out)
    features[-1] = features[-1] + official.no_mem_embed
    return [feature.permute(1, 2, 0).reshape(1, -1, *size) for feature, size in zip(features, sizes)]


def official_decode(official, embeddings, points, labels, masks=None, multimask=True):
    """The official SAM2ImagePredictor._predict path (raw logits, no object-score masking)."""
    sparse, dense = official.sam_prompt_encoder(points=(points, labels), boxes=None, masks=masks)
    return official.sam_mask_decoder(
        image_embeddings=embeddings[-1],
        image_pe=official.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=False,
        high_res_features=embeddings[:-1],
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_converted_folder_loads_strictly_and_matches_official_outputs(tiny, converted_dir, pixel_values):
    official = tiny[0]
    model, info = Sam2Model.from_pretrained(converted_dir, output_loading_info=True)
    assert {name: value for name, value in info.items() if value} == {}
    model.eval()

    with torch.no_grad():
        expected_embeddings = official_image_embeddings(official, pixel_values)
        embeddings = model.get_image_embeddings(pixel_values)
        assert [tuple(e.shape) for e in embeddings] == [(1, 32, 64, 64), (1, 64, 32, 32), (1, 256, 16, 16)]
        for level, expected in zip(embeddings, expected_embeddings):
            assert_close(level, expected)
        # the no-memory embedding is part of the stride-16 level
        assert not torch.allclose(expected_embeddings[-1] - official.no_mem_embed.view(1, -1, 1, 1), embeddings[-1])

        points = torch.tensor([[[0.3 * IMAGE_SIZE, 0.6 * IMAGE_SIZE], [0.7 * IMAGE_SIZE, 0.2 * IMAGE_SIZE]]])
        labels = torch.tensor([[1, 0]])
        box = torch.tensor([[0.1 * IMAGE_SIZE, 0.2 * IMAGE_SIZE, 0.8 * IMAGE_SIZE, 0.9 * IMAGE_SIZE]])
        mask_prompt = torch.randn(1, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4, generator=torch.Generator().manual_seed(3))
        cases = {
            # "no prompt" as official SAM2Base._forward_sam_heads encodes it: one padding point with label -1
            "no prompt": ({"points": torch.zeros(1, 1, 2), "labels": -torch.ones(1, 1, dtype=torch.int32)}, {}),
            "points": (
                {"points": points, "labels": labels},
                {"input_points": points[:, None], "input_labels": labels[:, None]},
            ),
            # the official predictor passes a box as its two corners with labels 2 and 3
            "box": ({"points": box.view(1, 2, 2), "labels": torch.tensor([[2, 3]])}, {"input_boxes": box[:, None]}),
            "points + mask": (
                {"points": points, "labels": labels, "masks": mask_prompt},
                {"input_points": points[:, None], "input_labels": labels[:, None], "input_masks": mask_prompt},
            ),
        }
        for name, (official_prompt, hf_prompt) in cases.items():
            for multimask in (True, False):
                masks, iou, _, object_score = official_decode(
                    official, expected_embeddings, multimask=multimask, **official_prompt
                )
                out = model(pixel_values=pixel_values, multimask_output=multimask, **hf_prompt)
                assert out.pred_masks.shape == (1, 1, 3 if multimask else 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4), name
                assert_close(out.pred_masks[:, 0], masks)
                assert_close(out.iou_scores[:, 0], iou)
                assert_close(out.object_score_logits[:, 0], object_score)


def test_every_official_key_is_mapped_or_dropped_with_a_reason(tiny, converted_dir):
    state_dict = tiny[0].state_dict()
    report = json.loads((converted_dir / CONVERSION_REPORT_NAME).read_text())
    # the image model keeps exactly the image encoder, prompt encoder, mask decoder and the no-memory embedding
    expected_dropped = {key for key in state_dict if not key.startswith(IMAGE_MODEL_PREFIXES) and key != "no_mem_embed"}
    assert set(report["dropped_keys"]) == expected_dropped
    assert all(reason in IMAGE_MODEL_DROPPED_PREFIXES.values() for reason in report["dropped_keys"].values())
    assert report["num_mapped_keys"] + len(expected_dropped) == report["num_source_keys"] == len(state_dict)
    assert report["target"] == "Sam2Model" and report["generation"] == "SAM2.1"

    # the point embeddings are stacked in label order and the Fourier matrix is copied to both places
    model = Sam2Model.from_pretrained(converted_dir)
    rows = torch.cat([state_dict[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)])
    assert torch.equal(model.prompt_encoder.point_embed.weight, rows)
    gaussian = state_dict["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(model.shared_image_embedding.positional_embedding, gaussian)
    assert torch.equal(model.prompt_encoder.shared_embedding.positional_embedding, gaussian)


def test_video_model_has_every_key_and_matches_official_memory_modules(tiny, pixel_values):
    official, config, _, _ = tiny
    model, result, report = build_sam2_model(official.state_dict(), config=config, video=True)
    assert isinstance(model, Sam2VideoModel)
    assert result.dropped == {} and len(result.mapped) == len(official.state_dict())
    assert report["target"] == "Sam2VideoModel"

    generator = torch.Generator().manual_seed(11)
    size = IMAGE_SIZE // 16
    with torch.no_grad():
        embeddings = official_image_embeddings(official, pixel_values)
        for level, expected in zip(model.get_image_embeddings(pixel_values), embeddings):
            assert_close(level, expected)

        # memory encoder: stride-16 features + a full-resolution mask (official skip_mask_sigmoid = HF's input)
        masks = torch.rand(1, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        expected_memory = official.memory_encoder(embeddings[-1], masks, skip_mask_sigmoid=True)
        memory, memory_position = model.memory_encoder(embeddings[-1], masks)
        assert_close(memory, expected_memory["vision_features"])
        assert_close(memory_position, expected_memory["vision_pos_enc"][0])

        # memory attention: current frame (HW, B, C) attends to 2 frames of memories (2·HW, B, 64)
        current = torch.randn(size * size, 1, 256, generator=generator)
        current_position = torch.randn(size * size, 1, 256, generator=generator)
        memories = torch.randn(2 * size * size, 1, 64, generator=generator)
        memories_position = torch.randn(2 * size * size, 1, 64, generator=generator)
        expected_attended = official.memory_attention(
            curr=current, memory=memories, curr_pos=current_position, memory_pos=memories_position
        )
        attended = model.memory_attention(
            current_vision_features=current,
            memory=memories,
            current_vision_position_embeddings=current_position,
            memory_posision_embeddings=memories_position,
        )
        assert attended.shape == (1, 1, size * size, 256)  # transformers: (1, batch, HW, C)
        assert_close(attended[0].transpose(0, 1), expected_attended)

        token = torch.randn(3, 256, generator=generator)
        assert_close(model.object_pointer_proj(token), official.obj_ptr_proj(token))
        assert_close(model.temporal_positional_encoding_projection_layer(token), official.obj_ptr_tpos_proj(token))
        assert torch.equal(model.occlusion_spatial_embedding_parameter, official.no_obj_embed_spatial)
        assert torch.equal(model.memory_temporal_positional_encoding, official.maskmem_tpos_enc)


def test_missing_keys_are_named(tiny, tmp_path):
    official, _, config_file, _ = tiny
    state_dict = official.state_dict()
    removed = [
        "image_encoder.trunk.blocks.2.attn.qkv.weight",
        "sam_prompt_encoder.point_embeddings.3.weight",
        "sam_mask_decoder.iou_prediction_head.layers.1.bias",
    ]
    for key in removed:
        del state_dict[key]
    checkpoint = tmp_path / "incomplete.pt"
    torch.save({"model": state_dict}, checkpoint)
    with pytest.raises(Sam2ConversionError, match="lacks 3 key") as error:
        convert_sam2_checkpoint(checkpoint, tmp_path / "out", config=config_file)
    for key in removed:
        assert key in str(error.value)
    assert not (tmp_path / "out").exists()


def test_unknown_keys_are_named(tiny, tmp_path):
    official, _, config_file, _ = tiny
    state_dict = official.state_dict()
    state_dict["sam_mask_decoder.extra_head.weight"] = torch.zeros(2)
    checkpoint = tmp_path / "extra.pt"
    torch.save({"model": state_dict}, checkpoint)
    with pytest.raises(Sam2ConversionError, match=r"match no rename rule: sam_mask_decoder\.extra_head\.weight"):
        convert_sam2_checkpoint(checkpoint, tmp_path / "out", config=config_file)


def test_files_that_are_not_sam2_checkpoints(tmp_path):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("this is not a checkpoint\n")
    with pytest.raises(Sam2ConversionError, match="not a PyTorch checkpoint"):
        load_sam2_checkpoint(text_file)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(Sam2ConversionError, match="not an official SAM2 checkpoint"):
        load_sam2_checkpoint(other)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps(argparse.Namespace(model="not tensors"), protocol=2))
    with pytest.raises(Sam2ConversionError, match="not a PyTorch checkpoint that torch.load can read safely"):
        load_sam2_checkpoint(pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sam2_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("size", ["tiny", "small", "base_plus", "large"])
@pytest.mark.parametrize("generation", ["sam2", "sam2.1"])
def test_size_presets_equal_the_official_configs(size, generation):
    from_yaml = sam2_architecture_from_official_config(official_yaml(size, generation))
    assert from_yaml == sam2_architecture_for_size(size, sam2_1=generation == "sam2.1")


def test_tiny_preset_is_transformers_default_sam2_config():
    """transformers' default Sam2Config describes sam2.1-hiera-tiny: an independent statement of the tiny shapes."""
    converted = sam2_config_from_architecture(SAM2_SIZE_PRESETS["tiny"]).to_dict()
    default = Sam2Config().to_dict()
    for sub in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        assert converted[sub] == default[sub], sub
    large = sam2_config_from_architecture(SAM2_SIZE_PRESETS["large"]).vision_config.backbone_config
    assert large.embed_dim_per_stage == [144, 288, 576, 1152]
    assert large.num_attention_heads_per_stage == [2, 4, 8, 16]
    assert large.window_size_per_stage == [8, 4, 16, 8]


def test_size_is_inferred_from_shapes_and_a_wrong_size_is_refused(tiny):
    for size in ("tiny", "small"):  # same width, different depth
        trunk = instantiate(OmegaConf.load(official_yaml(size)).model.image_encoder.trunk)
        state_dict = {f"image_encoder.trunk.{key}": value for key, value in trunk.state_dict().items()}
        for level, channels in enumerate([768, 384, 192, 96]):
            state_dict[f"image_encoder.neck.convs.{level}.conv.weight"] = torch.zeros(256, channels, 1, 1)
        assert infer_sam2_size(state_dict) == size

    with pytest.raises(Sam2ConversionError, match="matches no official size"):
        infer_sam2_size(tiny[0].state_dict())
    with pytest.raises(Sam2ConversionError, match=r"shapes of size large: embed_dim: architecture 144, checkpoint 32"):
        build_sam2_model(tiny[0].state_dict(), size="large")


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    """The full-size official tiny model (random weights, size inferred) through `maskcma convert sam2`."""
    torch.manual_seed(0)
    official = instantiate(OmegaConf.load(official_yaml("tiny")).model, _recursive_=True)
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, checkpoint)

    output = tmp_path / "converted"
    assert cli_main(["convert", "sam2", str(checkpoint), "--output", str(output)]) == 0
    assert "size tiny (inferred from the weights)" in capsys.readouterr().out
    model, info = Sam2Model.from_pretrained(output, output_loading_info=True)
    assert {name: value for name, value in info.items() if value} == {}
    assert model.config.vision_config.backbone_config.blocks_per_stage == [1, 2, 7, 2]
    assert torch.equal(
        model.vision_encoder.backbone.blocks[11].mlp.proj_out.weight,
        official.image_encoder.trunk.blocks[11].mlp.layers[1].weight,
    )

    # a second run into the same folder is refused, a wrong size gives a clear message and exit code 1
    assert cli_main(["convert", "sam2", str(checkpoint), "--output", str(output)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["convert", "sam2", str(checkpoint), "--output", str(tmp_path / "o2"), "--size", "small"]) == 2
    assert "look like size 'tiny'" in capsys.readouterr().err


def test_cli_video_with_official_config(tiny, tmp_path):
    _, _, config_file, checkpoint = tiny
    output = tmp_path / "video"
    argv = ["convert", "sam2", str(checkpoint), "--output", str(output), "--config", str(config_file), "--video"]
    assert cli_main(argv) == 0
    model, info = Sam2VideoModel.from_pretrained(output, output_loading_info=True)
    assert {name: value for name, value in info.items() if value} == {}
    assert model.config.memory_attention_num_layers == 2
    assert json.loads((output / CONVERSION_REPORT_NAME).read_text())["dropped_keys"] == {}
