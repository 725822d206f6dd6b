"""The demo end to end in its quick mode (a few steps): data, training with CMA on and off, evaluation against the
shuffled-prompt control, save/reload round trip, predictions with overlays, the ablation report."""

from __future__ import annotations

import json

import datasets

import numpy as np
import pytest

from transformers_maskcma.cli import main
from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
from transformers_maskcma.demo import evaluate_video, predict_video, spearman_correlation, video_ground_truth
from transformers_maskcma.evaluation.metrics.video import jaccard_per_frame
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.tiny import build_tiny_model, build_tiny_processor

from test_video_segmentation import perturb_sam2_heads


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "== MaskCMA demo summary ==" in printed and "held-out cIoU" in printed
    assert "video key frames" in printed and "video propagated frames" in printed and "Spearman" in printed

    results = json.loads((output / "results.json").read_text())
    assert [run["use_cma"] for run in results["runs"]] == [True, False]
    for run in results["runs"]:
        assert 0.0 <= run["ciou"] <= 1.0 and 0.0 <= run["shuffled_ciou"] <= 1.0
        # video numbers on the held-out clip, key frames and propagated frames apart, beside the control
        for scores in (run["video"], run["shuffled_video"]):
            assert scores["n_clips"] == 1
            for kind in ("key_frames", "propagated_frames"):
                assert set(scores[kind]) == {"J", "F", "J&F", "n_expressions"}
                assert 0.0 <= scores[kind]["J&F"] <= 1.0
        assert "score_iou_spearman" in run and "iou_loss" in run["final_logs"]
        assert run["final_logs"]["cma_warmup_factor"] >= 0.0 and "tmc_loss" in run["final_logs"]
    assert results["round_trip_identical"] is True
    # the CMA-off run trained in a second process: its log stays, its copy of the data is removed
    assert "training the tiny model (CMA off)" in (output / "work" / "cma_off.log").read_text()
    assert not (output / "work" / "cma_off_data").exists()
    assert results["settings"]["steps"] == 3
    # the demo trains on centred area targets, and its saved processor says so
    processor_config = json.loads((output / "model" / "processor_config.json").read_text())
    assert results["settings"]["gt_mask_resize"] == processor_config["gt_mask_resize"] == "area"

    # the saved folder loads strictly; predictions wrote overlays for a held-out image and clip
    MaskCMAModel.from_pretrained(output / "model")
    assert (output / "predict" / "image" / "overlay.png").is_file()
    assert (output / "predict" / "video" / "overlay.gif").is_file()
    assert [p["media_type"] for p in results["predictions"]] == ["image", "video"]
    report = (output / "cma_ablation.md").read_text()
    assert "| CMA on (`use_cma=True`) |" in report and "| CMA off" in report


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "0", "--output", str(tmp_path)]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_a_diverged_training_run_is_an_error_not_a_result(tmp_path):
    from dataclasses import replace

    from transformers_maskcma.demo import QUICK_SETTINGS, demo_data, train_model

    settings = replace(QUICK_SETTINGS, learning_rate=1e30, head_init_scale=None, paired_prompts=False)
    train, _ = demo_data(settings)
    with pytest.raises(RuntimeError, match="training diverged: .* NaN/inf"):
        train_model(settings, train, use_cma=True, output_dir=tmp_path)


# -- training data of the demo -------------------------------------------------------------------------------------


def _paired_scenes(num_scenes=12, seed=0):
    from dataclasses import replace

    from transformers_maskcma.data.synthetic import SyntheticConfig, load_synthetic

    config = SyntheticConfig(seed=seed, video_fraction=0.3, multi_object_fraction=1.0)
    return load_synthetic("train", num_scenes, replace(config, max_shapes=3))


def test_split_object_pairs_splits_or_keeps_each_scene_and_queries_follow_the_masks():
    from transformers_maskcma.demo import record_queries, scene_id, split_object_pairs

    scenes = _paired_scenes()
    split = split_object_pairs(scenes)
    assert len(split) == 2 * len(scenes)
    for k, record in enumerate(split):
        scene = scenes[k // 2]
        assert record["sample_id"] == f"{scene['sample_id']}#{k % 2}" and scene_id(record["sample_id"]) == scene["sample_id"]
        assert record["prompt"] == scene["prompt"].split(" and ")[k % 2]
        assert record["masks"] == [scene["masks"][k % 2]] and record["answer"] == ""
        assert record_queries(record) == [json.loads(scene["meta"])["queries"][k % 2]]
    kept = split_object_pairs(scenes, keep_fraction=1.0)
    assert kept["sample_id"] == scenes["sample_id"] and kept["prompt"] == scenes["prompt"]
    assert all(record_queries(r) == json.loads(r["meta"])["queries"] and len(r["masks"]) == 2 for r in kept)
    mixed = split_object_pairs(scenes, keep_fraction=0.5, seed=3)
    whole = [r["sample_id"] for r in mixed if "#" not in r["sample_id"]]
    assert 0 < len(whole) < len(scenes) and len(mixed) == 2 * len(scenes) - len(whole)
    assert mixed["sample_id"] == split_object_pairs(scenes, keep_fraction=0.5, seed=3)["sample_id"]  # seeded
    # the frames are the scene's PNG bytes, carried over as they are (not decoded and encoded again)
    assert split.features == scenes.features
    encoded = datasets.Sequence(datasets.Image(decode=False))
    scene_frames = scenes.cast_column("frames", encoded)["frames"]
    assert split.cast_column("frames", encoded)["frames"] == [frames for frames in scene_frames for _ in range(2)]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"color": "blue", "shape": "triangle", "position": "left", "motion": None}, "left blue triangle"),
        ({"color": None, "shape": None, "position": "top", "motion": None}, "top object"),
        ({"color": "red", "shape": None, "position": None, "motion": "still"}, "still red object"),
        ({"color": None, "shape": "circle", "position": None, "motion": None}, "circle"),
    ],
)
def test_canonical_description(query, expected):
    from transformers_maskcma.demo import canonical_description

    assert canonical_description(query) == expected


def test_demo_answers_name_every_object_in_mask_order():
    from transformers_maskcma.demo import canonical_description, demo_answer, record_queries, split_object_pairs

    kept = split_object_pairs(_paired_scenes(4), keep_fraction=1.0)[0]
    first, second = (canonical_description(q) for q in record_queries(kept))
    assert demo_answer(kept, "canonical") == f"Sure, [SEG] {first} and [SEG] {second}."
    a, b = kept["prompt"].split(" and ")
    assert demo_answer(kept, "prompt") == f"Sure, [SEG] {a[4:]} and [SEG] {b[4:]}."
    one = {"prompt": "the triangle that is red", "masks": [[]], "sample_id": "synthetic/train/000007#1",
           "meta": json.dumps({"queries": [{"color": "blue"}, {"color": "red", "shape": "triangle"}]})}
    assert demo_answer(one, "canonical") == "Sure, [SEG] red triangle."
    assert demo_answer(one, "prompt") == "Sure, [SEG] triangle that is red."


def test_scene_groups_keep_the_samples_of_a_scene_together():
    from transformers_maskcma.demo import FlattenCollator, SceneGroups, split_object_pairs

    records = split_object_pairs(_paired_scenes(10), keep_fraction=0.5, seed=1)
    groups = SceneGroups(list(range(len(records))), records)
    assert sum(len(group) for group in groups.groups) == len(records) and len(groups) == 10
    for group in groups.groups:
        ids = {records[i]["sample_id"].split("#")[0] for i in group}
        assert len(ids) == 1 and sum(len(records[i]["masks"]) for i in group) == 2  # two referred objects a scene
    assert FlattenCollator(lambda samples: samples)([groups[0], groups[1]]) == groups.groups[0] + groups.groups[1]
    with pytest.raises(ValueError, match="processed samples for"):
        SceneGroups([0], records)


def test_the_clip_share_of_training_is_set_apart_from_the_held_out_split():
    from dataclasses import replace

    from transformers_maskcma.demo import QUICK_SETTINGS, demo_data

    def clip_count(records):
        return sum(len(frames) > 1 for frames in records.cast_column(
            "frames", datasets.Sequence(datasets.Image(decode=False)))["frames"])

    settings = replace(QUICK_SETTINGS, train_samples=8, eval_samples=6, train_video_fraction=1.0,
                       synthetic={"video_fraction": 0.0})
    train, test = demo_data(settings)
    assert clip_count(train) == len(train) and clip_count(test) == 0
    # None: the training scenes follow `synthetic` too
    train, test = demo_data(replace(settings, train_video_fraction=None))
    assert clip_count(train) == 0 and clip_count(test) == 0


def test_bad_demo_data_settings_are_named():
    from dataclasses import replace

    from transformers_maskcma.demo import QUICK_SETTINGS, demo_data

    with pytest.raises(ValueError, match=r"answer_style='grounded' is not valid; use one of \['canonical'"):
        demo_data(replace(QUICK_SETTINGS, answer_style="grounded"))
    with pytest.raises(ValueError, match=r"two_object_fraction=1.5 must lie in \[0, 1\]"):
        demo_data(replace(QUICK_SETTINGS, two_object_fraction=1.5))


# -- the save/reload check can fail ----------------------------------------------------------------------------------


def test_round_trip_check_fails_without_masks_and_on_any_difference():
    import numpy as np

    from transformers_maskcma.demo import compare_round_trip

    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    forced = [np.stack([mask])]
    other = mask.copy()
    other[0, 0] = True

    nothing = compare_round_trip([None, None], [None, None], [], [])
    assert not nothing.identical and nothing.compared_masks == 0 and "no mask to compare" in nothing.message
    assert compare_round_trip([mask, None], [mask, None], forced, forced).identical
    assert compare_round_trip([mask, None], [mask, None], forced, forced).compared_masks == 2
    assert compare_round_trip([None], [None], forced, forced).identical  # the forced answer's masks are compared
    assert not compare_round_trip([mask], [other], forced, forced).identical
    assert "generated no mask" in compare_round_trip([mask], [None], forced, forced).message
    assert "ground-truth answer differ" in compare_round_trip([mask], [mask], forced, [np.stack([other])]).message


def test_demo_output_folder_belongs_to_one_run(tmp_path, capsys):
    from transformers_maskcma.run_folder import RunFolder

    output = tmp_path / "demo"
    RunFolder.claim(output, command="predict", fingerprint={"text": "x"}).record()
    (output / "mask_0.png").write_bytes(b"0")
    RunFolder.claim(output, command="predict", fingerprint={"text": "x"}, resume=True).record("mask_0.png")
    assert main(["demo", "--quick", "--no-ablation", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'command: "predict" vs "demo"' in err and "--overwrite" in err


def test_spearman_correlation_matches_hand_computed_ranks():
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert spearman_correlation(np.array([0.1, 0.2, 0.3, 0.4]), np.array([5.0, 7.0, 6.0, 9.0])) == pytest.approx(0.8)
    # ties share their mean rank: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3)
    expected = np.corrcoef([1.5, 1.5, 3.0], [1.0, 2.0, 3.0])[0, 1]
    assert spearman_correlation(np.array([1.0, 1.0, 2.0]), np.array([0.1, 0.2, 0.3])) == pytest.approx(expected)
    assert spearman_correlation(np.array([1.0]), np.array([2.0])) is None
    assert spearman_correlation(np.array([1.0, 1.0]), np.array([2.0, 3.0])) is None


def test_video_scores_separate_key_frames_from_propagated_frames():
    """`evaluate_video` scores the key frames (decoded from [SEG]) and the propagated frames apart with the project's
    J and F; every frame where the target is present gets a mask (the object score of this model is negative)."""
    model, tokenizer = build_tiny_model(seed=1)
    model.eval()
    perturb_sam2_heads(model, 1)
    seg_id, eos_id = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    # the random language model answers with one [SEG] (generation config, no head is touched)
    model.vlm.generation_config.sequence_bias = {(seg_id,): 50.0, (seg_id, eos_id): 200.0}
    processor = build_tiny_processor(tokenizer)
    config = SyntheticConfig(image_size=96, num_frames=7, video_fraction=1.0, multi_object_fraction=0.0, seed=2)
    clips = generate_synthetic(2, config, split="test", show_progress=False)
    scores = evaluate_video(model, processor, clips, "clips")
    assert scores["n_clips"] == 2 and scores["nonempty_where_present"] == 1.0

    key_j, propagated_j = [], []
    for record in clips:
        prediction, key_frames = predict_video(model, processor, record)
        assert key_frames == [0, 1, 2, 3, 4]  # the processor's default: the first five frames
        truth = video_ground_truth(record)
        j = jaccard_per_frame(prediction, truth)
        key_j.append(j[:5].mean())
        propagated_j.append(j[5:].mean())
    assert scores["key_frames"]["J"] == pytest.approx(np.mean(key_j))
    assert scores["propagated_frames"]["J"] == pytest.approx(np.mean(propagated_j))
    for kind in ("key_frames", "propagated_frames"):
        assert scores[kind]["J&F"] == pytest.approx((scores[kind]["J"] + scores[kind]["F"]) / 2)
