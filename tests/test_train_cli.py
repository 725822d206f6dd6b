"""`maskcma train`: YAML validation errors name the field; a tiny run trains, resumes and saves a loadable model."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoProcessor

from transformers_maskcma.cli import main
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.trainer.config import (
    RECIPE_DEFAULTS,
    TrainConfigError,
    load_train_config,
    parse_train_config,
)

BASE = {"data": {"sources": [{"dataset": "synthetic", "split": "train", "options": {"num_samples": 4}}]}}


def _write(tmp_path, content, name="train.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content) if not isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"training": {"learnin_rate": 1e-4}}, r"training\.learnin_rate is not a known field; did you mean 'learning_rate'"),
        ({"training": {"learning_rate": "fast"}}, r"training\.learning_rate must be a number, got 'fast'"),
        ({"training": {"per_device_train_batch_size": 2.5}}, r"training\.per_device_train_batch_size must be an integer"),
        ({"training": {"lr_scheduler_type": "cosin"}}, r"training\.lr_scheduler_type must be one of 'linear', 'cosine'"),
        ({"training": {"bf16": "yes"}}, r"training\.bf16 must be true/false"),
        ({"model": {"config": {"use_cma": "no"}}}, r"model\.config\.use_cma must be true/false"),
        ({"model": {"config": {"tmc_wieght": 0.1}}}, r"model\.config\.tmc_wieght is not a known field; did you mean 'tmc_weight'"),
        ({"model": {"tiny": {"seed": "zero"}}}, r"model\.tiny\.seed must be an integer"),
        ({"model": {"tiny": True, "path": "x"}}, r"give exactly one of tiny, path or parts"),
        ({"model": {"parts": {"vlm": "a"}}}, r"model\.parts\.sam2 is required"),
        ({"model": {"processor": {"num_key_frame": 4}}}, r"model\.processor\.num_key_frame is not a known field"),
        ({"model": {"processor": {"gt_mask_resize": "bilinear"}}}, r"model\.processor\.gt_mask_resize must be one of 'nearest', 'area'"),
        ({"lora": {"r": "big"}}, r"lora\.r must be an integer"),
        ({"lora": {"dropout": 1.5}}, r"lora\.dropout must lie in \[0, 1\)"),
        ({"data": {"sources": [], "mix": "m.yaml"}}, r"data: give either 'mix'"),
        ({"data": {"sources": [{"dataset": "synthetic"}], "train_frames": "some"}}, r"data\.train_frames must be 'key' or 'all'"),
        ({"data": {"sources": [{"dataset": "synthetic"}], "max_sample": 3}}, r"data\.max_sample is not a known field"),
        ({"optimizer": {}}, r"optimizer is not a known field; known fields: data, lora, model, training"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, section, message):
    content = {**BASE, **section}
    with pytest.raises(TrainConfigError, match=message) as error:
        load_train_config(_write(tmp_path, content))
    assert "train.yaml" in str(error.value)  # the file is named too


def test_bad_config_through_the_command(tmp_path, capsys):
    path = _write(tmp_path, {**BASE, "training": {"output_dir": str(tmp_path), "max_step": 3}})
    assert main(["train", str(path)]) == 2
    assert "training.max_step is not a known field; did you mean 'max_steps'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "training configuration not found" in capsys.readouterr().err
    malformed = _write(tmp_path, "model: [unclosed", name="bad.yaml")
    assert main(["train", str(malformed)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_recipe_defaults_and_overrides(tmp_path):
    config = parse_train_config({**BASE, "training": {"learning_rate": "1e-4", "save_steps": 7}})
    args = config.training_arguments(output_dir=str(tmp_path))
    assert args.learning_rate == 1e-4  # "1e-4" (a string for YAML 1.1) is read as a number
    assert args.save_steps == 7
    assert args.weight_decay == RECIPE_DEFAULTS["weight_decay"] == 0.05
    assert args.max_grad_norm == 1.0 and args.num_train_epochs == 1.0 and args.warmup_steps == 0.05
    assert args.lr_scheduler_type.value == "cosine" and args.optim.value == "adamw_torch"
    assert args.bf16 is False  # no GPU here
    with pytest.raises(TrainConfigError, match="training.output_dir is not set"):
        config.training_arguments()
    with pytest.raises(TrainConfigError, match="remove_unused_columns must be false"):
        parse_train_config({**BASE, "training": {"remove_unused_columns": True}}).training_arguments("out")


def test_train_resume_and_saved_model(tmp_path, capsys):
    output = tmp_path / "run"
    content = {
        "model": {"tiny": {"seed": 0}, "config": {"tmc_weight": 0.1}, "processor": {"gt_mask_resize": "area"}},
        "data": {"sources": [{"dataset": "synthetic", "split": "train", "options": {"num_samples": 6}}], "cache": True},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "training": {
            "per_device_train_batch_size": 2,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 2,
            "disable_tqdm": True,
            "use_cpu": True,
        },
    }
    path = _write(tmp_path, content)
    assert main(["train", str(path), "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "MaskCMA training finished" in printed and "(LoRA)" in printed
    assert (output / "checkpoint-2").is_dir()
    model = MaskCMAModel.from_pretrained(output / "model")
    assert (output / "model" / "tokenizer_config.json").is_file()
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoProcessor.from_pretrained(output / "model").gt_mask_resize == "area"  # the YAML's processor settings

    content["training"]["max_steps"] = 3
    path = _write(tmp_path, content)
    assert main(["train", str(path), "--output-dir", str(output), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "steps            3" in printed
    assert (output / "checkpoint-3").is_dir()
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        from transformers_maskcma.trainer.commands import resolve_resume

        resolve_resume(True, str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["recipe.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    import transformers_maskcma

    path = Path(transformers_maskcma.__file__).parent / "configs" / name
    config = load_train_config(path)
    with pytest.raises(TrainConfigError, match="training.output_dir is not set; .* pass --output-dir"):
        config.training_arguments()  # a packaged config never writes beside itself
    args = config.training_arguments(output_dir="runs/x")
    assert args.output_dir == "runs/x"  # --output-dir: relative to the working directory
    if name == "recipe.yaml":
        from transformers_maskcma.trainer.commands import mix_of

        mix, _ = mix_of(config)  # the packaged seed mix, found beside the packaged recipe
        assert mix.config_path == path.parent / "seed_mix.yaml" and mix.sources
        assert config.model.source == "parts" and config.lora.enabled and (config.lora.r, config.lora.alpha) == (128, 256)
        assert config.data.mix == "seed_mix.yaml"
        assert args.learning_rate == 4e-5 and args.weight_decay == 0.05 and args.lr_scheduler_type.value == "cosine"
    else:
        assert config.model.source == "tiny" and not config.lora.enabled and args.max_steps == 250


def test_every_relative_yaml_path_is_relative_to_the_yaml_folder(tmp_path, monkeypatch):
    from transformers_maskcma.trainer.commands import mix_of

    config_dir, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    config_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "m.yaml").write_text(yaml.safe_dump({"sources": [{"dataset": "synthetic", "split": "train"}]}))
    monkeypatch.chdir(elsewhere)
    (config_dir / "ds.json").write_text('{"train_micro_batch_size_per_gpu": "auto"}')
    content = {"data": {"mix": "m.yaml"}, "training": {"output_dir": "out", "deepspeed": "ds.json"}}
    config = load_train_config(_write(config_dir, content))
    assert config.resolve_path("ds.json") == config_dir / "ds.json"
    args = config.training_arguments(deepspeed=None)  # (deepspeed itself is not installed here)
    assert args.output_dir == str(config_dir / "out")
    # no fallback to the working directory, where a file of that name exists
    with pytest.raises(FileNotFoundError, match=f"mix file not found: {config_dir / 'm.yaml'}"):
        mix_of(config)
    (config_dir / "m.yaml").write_text((elsewhere / "m.yaml").read_text())
    assert mix_of(config)[0].config_path == config_dir / "m.yaml"


def test_a_bad_model_value_is_one_line_naming_the_section(tmp_path, capsys):
    # a choice is checked with the YAML (it names the field); a value only the model config can check is named too
    content = {**BASE, "model": {"config": {"mask_source": "bogus"}}, "training": {"max_steps": 1, "use_cpu": True}}
    assert main(["train", str(_write(tmp_path, content)), "--output-dir", str(tmp_path / "out")]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert "train.yaml: model.config.mask_source must be one of 'pred', 'conv', 'gt', got 'bogus'" in err
    content = {**BASE, "model": {"config": {"cma_topk_tokens": 0}}, "training": {"max_steps": 1, "use_cpu": True}}
    assert main(["train", str(_write(tmp_path, content)), "--output-dir", str(tmp_path / "out2")]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert "train.yaml: model: MaskCMAConfig.cma_topk_tokens=0 is not valid" in err


def _custom_training_yaml(root, extra_prompt_words: int, drop_invalid: bool):
    import json

    from fixtures_data import write_custom

    write_custom(root)
    lines = (root / "train.jsonl").read_text().splitlines()
    long_line = json.loads(lines[0])
    long_line["id"], long_line["prompt"] = "too_long", "Segment " + "the red cat " * extra_prompt_words
    (root / "train.jsonl").write_text("\n".join(lines + [json.dumps(long_line)]) + "\n")
    content = {
        "model": {"tiny": {"seed": 0}},
        "data": {"sources": [{"dataset": "custom", "path": "train.jsonl", "split": "train"}], "drop_invalid": drop_invalid},
        "lora": {"enabled": False},
        "training": {"per_device_train_batch_size": 1, "max_steps": 1, "use_cpu": True, "disable_tqdm": True,
                     "save_strategy": "no", "output_dir": "run"},
    }  # fmt: skip
    return _write(root, content)


def _error_lines(err: str) -> list[str]:
    """The command's error lines (progress bars of the data loading are on stderr too)."""
    return [line for line in err.splitlines() if line.startswith("maskcma ")]


def test_a_too_long_prompt_stops_the_run_before_step_0_naming_the_record(tmp_path, capsys):
    path = _custom_training_yaml(tmp_path, extra_prompt_words=400, drop_invalid=False)
    assert main(["train", str(path)]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert "Traceback" not in err
    assert "train.jsonl:4" in err and "tokens, more than the limit of 1024" in err
    assert not (tmp_path / "run" / "model").exists() and not list((tmp_path / "run").glob("checkpoint-*"))


def test_drop_invalid_drops_and_counts_the_bad_record(tmp_path, capsys):
    path = _custom_training_yaml(tmp_path, extra_prompt_words=400, drop_invalid=True)
    assert main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "training records 3 (1 invalid record(s) dropped: data.drop_invalid)" in printed
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # the YAML's output_dir, beside the YAML


def test_training_sequence_length_matches_the_processor(tmp_path):
    from fixtures_data import write_custom

    from transformers_maskcma.data import load_custom
    from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
    from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor
    from transformers_maskcma.tiny import build_tiny_model
    from transformers_maskcma.trainer.data import training_sequence_length

    model, tokenizer = build_tiny_model(seed=0)
    write_custom(tmp_path)
    records = [*load_custom(tmp_path / "train.jsonl"), *generate_synthetic(
        4, SyntheticConfig(video_fraction=0.5, multi_object_fraction=0.5, seed=3), show_progress=False
    )]  # fmt: skip
    for processor in (
        MaskCMAProcessor.from_model_config(model.config, tokenizer),
        MaskCMAProcessor.from_model_config(model.config, tokenizer, max_image_tiles=4, num_key_frames=2),
    ):
        for record in records:
            expected = processor.prepare_record(record)["input_ids"].shape[1]
            assert training_sequence_length(processor, record) == expected, record["sample_id"]


def test_train_output_folder_belongs_to_one_run(tmp_path, capsys):
    content = {
        "model": {"tiny": {"seed": 0}},
        "data": {"sources": [{"dataset": "synthetic", "split": "train", "options": {"num_samples": 4}}]},
        "lora": {"enabled": False},
        "training": {"per_device_train_batch_size": 2, "max_steps": 2, "save_steps": 1, "use_cpu": True,
                     "disable_tqdm": True, "learning_rate": 1e-3, "output_dir": "run"},
    }  # fmt: skip
    path = _write(tmp_path, content)
    run = tmp_path / "run"
    assert main(["train", str(path)]) == 0
    assert {"checkpoint-1", "checkpoint-2", "model"} <= {p.name for p in run.iterdir()}
    (run / "notes.txt").write_text("the user's own file")
    capsys.readouterr()

    assert main(["train", str(path)]) == 2  # a finished run is not retrained silently
    err = capsys.readouterr().err
    assert "holds a finished or earlier `train` run" in err and "--resume" in err and "--overwrite" in err
    content["training"]["learning_rate"] = 5e-4
    changed = _write(tmp_path, content)
    assert main(["train", str(changed), "--resume"]) == 2
    assert "training.learning_rate: 0.001 vs 0.0005" in capsys.readouterr().err

    content["training"]["max_steps"] = 1
    assert main(["train", str(_write(tmp_path, content)), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "maskcma_run.json", "model", "notes.txt"]
