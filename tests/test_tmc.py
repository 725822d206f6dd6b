"""The symmetric TMC loss against an independent (numpy, loop-based) computation on hand-made batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transformers_maskcma.modeling.tmc import text_mask_contrastive_loss


def _normalize(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _reference_tmc(seg, pooled, target_seg, has_mask, sample, objects, tau):
    """Symmetric InfoNCE written out with explicit loops: per [SEG], the mean of its visible targets' pooled
    features; entries of the same (sample, object) other than the diagonal are left out of both softmaxes."""
    rows, visual = [], []
    for index in range(len(seg)):
        frames = [pooled[t] for t in range(len(target_seg)) if target_seg[t] == index and has_mask[t]]
        if frames:
            rows.append(index)
            visual.append(_normalize(np.mean(frames, axis=0)))
    text = [_normalize(seg[i]) for i in rows]
    groups = [(sample[i], objects[i]) for i in rows]
    n = len(rows)
    logits = [[float(np.dot(visual[i], text[j])) / tau for j in range(n)] for i in range(n)]

    def cross_entropy(score_row, i):
        allowed = [score_row[j] for j in range(n) if j == i or groups[j] != groups[i]]
        return -score_row[i] + math.log(sum(math.exp(value) for value in allowed))

    visual_to_text = sum(cross_entropy(logits[i], i) for i in range(n)) / n
    text_to_visual = sum(cross_entropy([logits[j][i] for j in range(n)], i) for i in range(n)) / n
    return 0.5 * (visual_to_text + text_to_visual), n, len(set(groups))


def _hand_made_batch():
    generator = np.random.default_rng(3)
    # sample 0 (image): [SEG] 0 → object 0, [SEG] 1 → object 1, [SEG] 2 → object 0 again (repeated object)
    # sample 1 (video, 3 frames): [SEG] 3 → object 0 on frames 0–2 (absent on frame 1);
    #                             [SEG] 4 → object 7, absent on its only target (not a row)
    seg = generator.normal(size=(5, 8))
    pooled = generator.normal(size=(7, 8))
    target_seg = [0, 1, 2, 3, 3, 3, 4]
    has_mask = [True, True, True, True, False, True, False]
    pooled[4] = 0.0
    pooled[6] = 0.0
    sample = [0, 0, 0, 1, 1]
    objects = [0, 1, 0, 0, 7]
    return seg, pooled, target_seg, has_mask, sample, objects


def _torch_inputs(seg, pooled, target_seg, has_mask, sample, objects):
    return dict(
        seg_embeds=torch.tensor(seg, dtype=torch.float64, requires_grad=True),
        mask_pooled_embeds=torch.tensor(pooled, dtype=torch.float64, requires_grad=True),
        target_seg_index=torch.tensor(target_seg),
        target_has_mask=torch.tensor(has_mask),
        seg_sample_index=torch.tensor(sample),
        seg_object_ids=None if objects is None else torch.tensor(objects),
    )


def test_tmc_matches_independent_computation_with_repeated_object():
    batch = _hand_made_batch()
    expected, num_rows, num_objects = _reference_tmc(*batch, tau=0.15)
    output = text_mask_contrastive_loss(**_torch_inputs(*batch), temperature=0.15)
    assert (output.num_rows, output.num_objects) == (num_rows, num_objects) == (4, 3)
    assert not output.skipped
    assert output.loss.item() == pytest.approx(expected, rel=1e-6)
    output.loss.backward()  # differentiable in both embeddings


def test_repeated_object_is_not_a_negative():
    """Ignoring the grouping (each [SEG] its own object) gives a different, larger loss here: the repeated
    object's second [SEG] would be a negative of the first."""
    seg, pooled, target_seg, has_mask, sample, _ = _hand_made_batch()
    seg[2] = seg[0]  # the repeated object's two [SEG] embeddings agree
    grouped = text_mask_contrastive_loss(**_torch_inputs(seg, pooled, target_seg, has_mask, sample, [0, 1, 0, 0, 7]))
    ungrouped = text_mask_contrastive_loss(**_torch_inputs(seg, pooled, target_seg, has_mask, sample, None))
    expected_ungrouped, _, objects = _reference_tmc(seg, pooled, target_seg, has_mask, sample, [0, 1, 2, 3, 4], 0.15)
    assert objects == 4 and ungrouped.num_objects == 4
    assert ungrouped.loss.item() == pytest.approx(expected_ungrouped, rel=1e-6)
    assert ungrouped.loss.item() > grouped.loss.item() + 0.1


def test_fewer_than_two_objects_gives_zero_and_is_flagged():
    seg, pooled, _, _, _, _ = _hand_made_batch()
    # one sample, two [SEG] of the same object: one group only
    output = text_mask_contrastive_loss(
        **_torch_inputs(seg[:2], pooled[:2], [0, 1], [True, True], [0, 0], [4, 4]), temperature=0.1
    )
    assert output.skipped and output.num_objects == 1 and output.num_rows == 2
    assert output.loss.item() == 0.0
    output.loss.backward()  # still attached to the graph
    # two objects, but one never visible: skipped too
    output = text_mask_contrastive_loss(**_torch_inputs(seg[:2], pooled[:2], [0, 1], [True, False], [0, 0], None))
    assert output.skipped and output.num_rows == 1


def test_same_object_id_in_different_samples_are_different_objects():
    seg, pooled, _, _, _, _ = _hand_made_batch()
    args = (seg[:2], pooled[:2], [0, 1], [True, True], [0, 1], [0, 0])
    output = text_mask_contrastive_loss(**_torch_inputs(*args), temperature=0.2)
    expected, _, objects = _reference_tmc(*args, tau=0.2)
    assert objects == output.num_objects == 2
    assert output.loss.item() == pytest.approx(expected, rel=1e-6)


def test_bad_inputs_are_named():
    seg, pooled, target_seg, has_mask, sample, objects = _hand_made_batch()
    inputs = _torch_inputs(seg, pooled, target_seg, has_mask, sample, objects)
    with pytest.raises(ValueError, match="seg_object_ids has 2 entries"):
        text_mask_contrastive_loss(**{**inputs, "seg_object_ids": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        text_mask_contrastive_loss(**inputs, temperature=0.0)
    with pytest.raises(ValueError, match="one row per target"):
        text_mask_contrastive_loss(**{**inputs, "target_has_mask": torch.tensor([True])})


def test_sort_based_grouping_equals_unique_dim0_on_random_keys_with_repeats():
    from transformers_maskcma.modeling.tmc import group_rows

    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        num_rows = int(torch.randint(1, 40, (1,), generator=generator))
        high = int(torch.randint(1, 6, (1,), generator=generator))  # small range: many repeated rows
        keys = torch.randint(0, high, (num_rows, 2), generator=generator)
        expected = torch.unique(keys, dim=0, return_inverse=True)[1]
        assert torch.equal(group_rows(keys), expected), keys
    empty = torch.zeros(0, 2, dtype=torch.long)
    assert group_rows(empty).shape == (0,)
