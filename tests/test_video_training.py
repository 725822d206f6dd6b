"""Video training through SAM2's memory (`video_training="propagate"`): gradients reach the memory modules and the
CMA on propagated frames, a propagated frame's loss equals the inference path's recomputation, `"independent"` is
unchanged, resume is exact, and batches mix images and clips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from transformers_maskcma import MaskCMAConfig
from transformers_maskcma.modeling.mask_decoding import dice_loss, sigmoid_bce_loss
from transformers_maskcma.modeling.video_segmentation import VideoMaskPropagation
from transformers_maskcma.modeling.video_training import SAM2_MEMORY_MODULES, SAM2_MEMORY_PARAMETERS
from transformers_maskcma.processing import MaskCMAProcessor
from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.trainer.collator import MaskCMADataCollator
from transformers_maskcma.trainer.data import ProcessedRecords, clip_window
from transformers_maskcma.trainer.lora import default_lora_config
from transformers_maskcma.trainer.trainer import MaskCMATrainer

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_independent_losses import LOSS_TERMS, independent_batch, independent_losses, synthetic_records  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "independent_losses.json"
CLIP_FRAMES = 8  # the synthetic clips' length: the whole clip, 5 key frames ("first") and 3 propagated


def propagate_model(seed: int = 0, gamma: float = 0.5, **overrides):
    model, tokenizer = build_tiny_model(seed=seed, video_training="propagate", **overrides)
    with torch.no_grad():
        model.cma.gamma.fill_(gamma)  # γ = 0 would make the CMA add exactly nothing
    return model, tokenizer


def clip_batch(model, tokenizer, rows=(0, 1, 2)) -> dict:
    """The collated batch of `synthetic_records()` (two images, one clip) as propagation clips."""
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    dataset = ProcessedRecords(synthetic_records(), processor, video_clip_frames=CLIP_FRAMES)
    return MaskCMADataCollator(processor)([dataset[i] for i in rows])


def propagated_targets(batch: dict) -> torch.Tensor:
    return (~batch["conditioning_frame_mask"][batch["target_frame_index"]]).nonzero(as_tuple=True)[0]


# -- configuration and data ---------------------------------------------------------------------------------------


def test_video_training_is_validated_with_a_clear_error():
    assert MaskCMAConfig().video_training == "independent"
    with pytest.raises(ValueError, match=r"video_training='propagated' is not valid; allowed values are"):
        MaskCMAConfig(video_training="propagated")
    with pytest.raises(ValueError, match=r"video_training_clip_frames=1 is not valid; use an integer >= 2"):
        MaskCMAConfig(video_training="propagate", video_training_clip_frames=1)


def test_clips_mark_their_key_frames_and_batches_mix_images_and_clips():
    model, tokenizer = propagate_model()
    batch = clip_batch(model, tokenizer)
    # two images (one frame each, conditioning), then the clip: 5 key frames ("first") and 3 propagated
    assert batch["conditioning_frame_mask"].tolist() == [True] * 7 + [False] * 3
    assert batch["frame_sample_index"].tolist() == [0, 1] + [2] * CLIP_FRAMES
    assert batch["gt_masks"].shape[0] == 2 + CLIP_FRAMES  # a loss on every frame of the clip
    # without propagation clips the batch is exactly what it was
    assert "conditioning_frame_mask" not in independent_batch(model, tokenizer)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    with pytest.raises(ValueError, match="leave no frame to propagate"):
        ProcessedRecords(synthetic_records(), processor, video_clip_frames=5)
    # a longer video gives a window of the clip's length, the same for the same seed and index
    assert clip_window(30, 8, seed=0, index=4) == clip_window(30, 8, seed=0, index=4)
    start, stop = clip_window(30, 8, seed=0, index=4)
    assert stop - start == 8 and 0 <= start <= 22
    assert clip_window(6, 8, seed=0, index=4) == (0, 6)


def test_memory_modules_train_only_with_propagate_and_lora_saves_them():
    frozen, _ = build_tiny_model(seed=0)  # default freezing: SAM2 except its mask decoder
    trained, _ = build_tiny_model(seed=0, video_training="propagate")
    for name in SAM2_MEMORY_MODULES:
        assert not any(p.requires_grad for p in frozen.sam2.get_submodule(name).parameters()), name
        assert all(p.requires_grad for p in trained.sam2.get_submodule(name).parameters()), name
    for name in SAM2_MEMORY_PARAMETERS:
        assert not frozen.sam2.get_parameter(name).requires_grad and trained.sam2.get_parameter(name).requires_grad
    assert not any(p.requires_grad for p in trained.sam2.vision_encoder.parameters())  # the image encoder stays
    saved = default_lora_config(trained).modules_to_save
    assert {f"sam2.{name}" for name in SAM2_MEMORY_MODULES} <= set(saved)
    assert not any(name.startswith(("sam2.memory", "sam2.object_pointer")) for name in default_lora_config(frozen).modules_to_save)


def test_lora_trains_the_memory_modules_copies_on_propagated_frames():
    from transformers_maskcma.trainer.lora import apply_lora

    model, tokenizer = propagate_model()
    batch = clip_batch(model, tokenizer)
    peft_model = apply_lora(model, default_lora_config(model, r=4, lora_alpha=8))
    peft_model.train()
    output = peft_model(**batch)
    output.loss.backward()
    for name in SAM2_MEMORY_MODULES[:3]:
        copies = [p for n, p in peft_model.named_parameters() if f"sam2.{name}.modules_to_save." in n]
        assert copies and all(p.requires_grad for p in copies), name
        assert sum(float(p.grad.abs().sum()) for p in copies if p.grad is not None) > 0, name
    originals = [p for n, p in peft_model.named_parameters() if "sam2.memory_attention.original_module." in n]
    assert originals and not any(p.requires_grad for p in originals)


# -- gradients ------------------------------------------------------------------------------------------------------


def _gradients_of_propagated_loss(cma_on_propagation: bool) -> dict[str, torch.Tensor]:
    model, tokenizer = propagate_model(cma_on_propagation=cma_on_propagation, freeze_sam2_image_encoder=False)
    model.train()
    batch = clip_batch(model, tokenizer)
    torch.manual_seed(0)
    output = model(**batch)
    rows = propagated_targets(batch)
    gt = torch.nn.functional.interpolate(batch["gt_masks"][rows, None], size=output.pred_masks.shape[-2:])[:, 0]
    sigmoid_bce_loss(output.pred_masks[rows], gt).backward()  # a loss on the propagated frames only
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_the_loss_of_propagated_frames_reaches_memory_pointers_prompts_and_the_cma():
    with_cma = _gradients_of_propagated_loss(cma_on_propagation=True)
    without_cma = _gradients_of_propagated_loss(cma_on_propagation=False)

    def norm(grads, prefix):
        return sum(float(g.norm()) for name, g in grads.items() if name.startswith(prefix))

    for prefix in ("sam2.memory_attention.", "sam2.memory_encoder.", "sam2.object_pointer_proj.", "seg_proj."):
        assert norm(with_cma, prefix) > 0, prefix  # through the memories and pointers of the key frames
    assert norm(with_cma, "sam2.mask_decoder.") > 0
    # the CMA on the memory-conditioned features adds its own gradient (beyond the key frames' CMA)
    cma_names = [name for name in with_cma if name.startswith("cma.")]
    assert cma_names and any(not torch.equal(with_cma[n], without_cma.get(n, torch.zeros(()))) for n in cma_names)
    assert norm(with_cma, "cma.") > 0


def test_the_gamma_warmup_applies_on_propagated_frames():
    """At warm-up factor 0 the CMA adds nothing anywhere: the propagated masks equal those without the CMA on
    propagated frames; at factor 1 they differ."""
    outputs = {}
    for cma_on_propagation in (True, False):
        model, tokenizer = propagate_model(cma_on_propagation=cma_on_propagation)
        model.eval()
        batch = clip_batch(model, tokenizer)
        for factor in (0.0, 1.0):
            model.set_cma_warmup_factor(factor)
            with torch.no_grad():
                outputs[(cma_on_propagation, factor)] = model(**batch).pred_masks[propagated_targets(batch)]
    assert torch.equal(outputs[(True, 0.0)], outputs[(False, 0.0)])
    assert not torch.allclose(outputs[(True, 1.0)], outputs[(False, 1.0)])


# -- equal to inference -------------------------------------------------------------------------------------------


def test_a_propagated_frames_loss_equals_the_inference_paths_recomputation():
    """In eval mode (no dropout), the training path's masks and losses on the propagated frames equal those of the
    inference path (`VideoMaskPropagation`, SAM2's `track_frame` under no_grad) run from the same ``[SEG]`` and text
    embeddings on the same frames."""
    model, tokenizer = propagate_model(seed=2)
    model.eval()
    batch = clip_batch(model, tokenizer)
    output = model(**batch)
    rows = propagated_targets(batch)
    assert output.pred_masks.requires_grad  # the training path, with gradients

    with torch.no_grad():  # the same prompt embeddings, read from the VLM as forward does
        hidden = model.vlm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], output_hidden_states=True,
        ).hidden_states[-1]
        prompt_mask = model._prompt_text_mask(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["text_token_mask"]
        )
        seg_embeds, seg_sample, text_tokens, text_mask = model.project_text_and_seg(
            hidden, batch["input_ids"], prompt_mask
        )
    clip = 2
    frames = batch["sam_pixel_values"][batch["frame_sample_index"] == clip]
    key_frames = batch["conditioning_frame_mask"][batch["frame_sample_index"] == clip].nonzero()[:, 0].tolist()
    propagation = VideoMaskPropagation(
        model, frames, key_frames, seg_embeds[seg_sample == clip], text_tokens[clip], text_mask[clip],
        bounded_memory=False,
    )
    inference = {frame.frame_index: frame for frame in propagation}
    first_frame = int((batch["frame_sample_index"] == clip).nonzero()[0])
    expected = torch.stack(
        [inference[int(batch["target_frame_index"][r]) - first_frame].mask_logits[0] for r in rows.tolist()]
    )
    torch.testing.assert_close(output.pred_masks[rows].detach(), expected, rtol=1e-4, atol=1e-4)
    expected_scores = torch.stack(
        [inference[int(batch["target_frame_index"][r]) - first_frame].object_score_logits[0] for r in rows.tolist()]
    )
    torch.testing.assert_close(output.object_score_logits[rows].detach(), expected_scores, rtol=1e-4, atol=1e-4)
    gt = torch.nn.functional.interpolate(batch["gt_masks"][rows, None], size=expected.shape[-2:])[:, 0]
    trained = sigmoid_bce_loss(output.pred_masks[rows], gt) + dice_loss(output.pred_masks[rows], gt)
    trained = trained.detach()
    recomputed = sigmoid_bce_loss(expected, gt) + dice_loss(expected, gt)
    assert float(trained) == pytest.approx(float(recomputed), rel=1e-5)


# -- "independent" unchanged ------------------------------------------------------------------------------------


def test_independent_training_is_unchanged_from_before_video_training():
    """The loss terms and the gradient norm of a fixed batch (two images, one clip's key frames) equal those the code
    before `video_training` existed computed (`fixtures/make_independent_losses.py`, commit b99dd36). The forward of
    that commit left the contrastive (TMC) loss to the trainer; the model's total now includes `tmc_weight · tmc_loss`,
    so the comparison sets `tmc_weight=0` (the terms the old total held)."""
    saved = json.loads(FIXTURE.read_text())
    now = independent_losses(tmc_weight=0.0)
    assert now["num_targets"] == saved["num_targets"]
    for name in (*LOSS_TERMS, "grad_norm"):
        assert now[name] == pytest.approx(saved[name], rel=1e-6, abs=1e-7), name


def _loss_and_grads(model, batch):
    model.zero_grad()
    torch.manual_seed(0)
    output = model(**batch)
    output.loss.backward()
    return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_independent_ignores_clip_marks_and_propagate_without_clips_is_the_image_path_bit_for_bit():
    model, tokenizer = build_tiny_model(seed=0, freeze_sam2_image_encoder=False)
    model.train()
    clips = clip_batch(model, tokenizer)
    unmarked = {key: value for key, value in clips.items() if key != "conditioning_frame_mask"}
    marked_output, marked_grads = _loss_and_grads(model, clips)
    plain_output, plain_grads = _loss_and_grads(model, unmarked)
    for name in LOSS_TERMS:
        assert torch.equal(getattr(marked_output, name), getattr(plain_output, name)), name
    assert marked_grads.keys() == plain_grads.keys()
    assert all(torch.equal(marked_grads[n], plain_grads[n]) for n in plain_grads)

    # same weights, propagate: a batch without clips (images, a clip's key frames) takes the image path
    model.config.video_training = "propagate"
    key_frames = independent_batch(model, tokenizer)
    all_conditioning = {**key_frames, "conditioning_frame_mask": torch.ones(key_frames["sam_pixel_values"].shape[0], dtype=torch.bool)}
    propagate_outputs = [_loss_and_grads(model, batch) for batch in (key_frames, all_conditioning)]
    model.config.video_training = "independent"
    independent_output, independent_grads = _loss_and_grads(model, key_frames)
    for propagate_output, propagate_grads in propagate_outputs:
        for name in LOSS_TERMS:
            assert torch.equal(getattr(propagate_output, name), getattr(independent_output, name)), name
        assert all(torch.equal(propagate_grads[n], independent_grads[n]) for n in independent_grads)


# -- mixed batches ----------------------------------------------------------------------------------------------


def test_a_mixed_batch_decodes_each_sample_as_alone_and_averages_the_losses_over_targets():
    model, tokenizer = propagate_model()
    model.eval()  # no dropout: the same computation in every batch
    with torch.no_grad():
        mixed = model(**clip_batch(model, tokenizer))
        images = model(**clip_batch(model, tokenizer, rows=(0, 1)))
        clip = model(**clip_batch(model, tokenizer, rows=(2,)))
    torch.testing.assert_close(mixed.pred_masks, torch.cat([images.pred_masks, clip.pred_masks]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        mixed.iou_scores, torch.cat([images.iou_scores, clip.iou_scores]), rtol=1e-4, atol=1e-4
    )
    num_images, num_clip = images.pred_masks.shape[0], clip.pred_masks.shape[0]
    for name in ("mask_bce", "mask_dice", "object_score_loss"):
        expected = (num_images * getattr(images, name) + num_clip * getattr(clip, name)) / (num_images + num_clip)
        assert float(getattr(mixed, name)) == pytest.approx(float(expected), rel=1e-4), name


# -- resume ---------------------------------------------------------------------------------------------------------


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _trainer(tmp_path, model, dataset, processor, **overrides) -> MaskCMATrainer:
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
        optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=0.25, max_grad_norm=1.0, logging_steps=1,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True, seed=0, data_seed=0,
    )
    args.update(overrides)
    return MaskCMATrainer(
        model=model, args=TrainingArguments(**args), train_dataset=dataset,
        data_collator=MaskCMADataCollator(processor), tmc_weight=0.1,
    )


def test_resuming_a_propagation_run_continues_it_exactly(tmp_path):
    """Four steps on clips (memory-attention dropout on, CMA warm-up over half the run), interrupted after the
    checkpoint of step 2 and resumed into a model with other weights: steps 3 and 4 and the final weights are the
    uninterrupted run's."""
    from transformers_maskcma.data.synthetic import SyntheticConfig, load_synthetic

    records = load_synthetic("train", 12, SyntheticConfig(seed=4, video_fraction=0.5))
    overrides = {"warmup_ratio": 0.5, "freeze_sam2_image_encoder": False}
    model, tokenizer = build_tiny_model(seed=0, video_training="propagate", **overrides)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    dataset = ProcessedRecords(records.select(range(8)), processor, video_clip_frames=CLIP_FRAMES)
    assert sum(not bool(dataset[i].get("conditioning_frame_mask", torch.ones(1)).all()) for i in range(8)) >= 2

    straight = LossRecorder()
    full = _trainer(tmp_path, model, dataset, processor)
    full.add_callback(straight)
    full.train()
    other, _ = build_tiny_model(seed=1, video_training="propagate", **overrides)
    resumed = LossRecorder()
    trainer = _trainer(tmp_path, other, dataset, processor)
    trainer.add_callback(resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert sorted(straight.losses) == [1, 2, 3, 4] and sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == straight.losses[step], step
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name


# -- maskcma train ------------------------------------------------------------------------------------------------


def test_maskcma_train_runs_propagation_clips_from_the_yaml(tmp_path, capsys):
    import yaml

    from transformers_maskcma.cli import main

    content = {
        "model": {
            "tiny": {"seed": 0},
            "config": {"video_training": "propagate", "video_training_clip_frames": 6},
            "processor": {"num_key_frames": 2},
        },
        # 7 images and one 8-frame clip; 2 steps of 4 samples see all of them
        "data": {"sources": [{"dataset": "synthetic", "split": "train", "options": {"num_samples": 8}}]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "use_cpu": True,
                     "lr_scheduler_type": "constant", "warmup_steps": 0,
                     "logging_steps": 1, "report_to": []},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(content))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 0
    assert "steps            2" in capsys.readouterr().out
    from transformers_maskcma.modeling import MaskCMAModel

    trained = MaskCMAModel.from_pretrained(tmp_path / "run" / "model")
    assert trained.config.video_training == "propagate" and trained.config.video_training_clip_frames == 6
    # the clip's propagated frames trained SAM2's memory (frozen, and unchanged, without "propagate")
    initial, _ = build_tiny_model(seed=0)
    for name in ("memory_attention", "memory_encoder"):
        before = dict(initial.sam2.get_submodule(name).named_parameters())
        after = dict(trained.sam2.get_submodule(name).named_parameters())
        assert any(not torch.equal(before[key], after[key]) for key in before), name

    content["model"]["config"]["video_training"] = "propagated"
    path.write_text(yaml.safe_dump(content))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "bad")]) == 2
    assert "video_training" in capsys.readouterr().err
