"""The numpy metrics against hand-computed values and an independent brute-force boundary matcher."""

from __future__ import annotations

import numpy as np
import pytest

from transformers_maskcma.evaluation.metrics import (
    aggregate_video,
    boundary_f_measure,
    boundary_precision_recall,
    boundary_radius,
    dilate_with_disk,
    disk,
    giou_ciou_from_counts,
    image_referring_metrics,
    jaccard_per_frame,
    official_accuracy_per_frame,
    official_robustness_per_frame,
    pixel_accuracy_per_frame,
    revos_scores,
    robustness_per_frame,
    seg2bmap,
    video_expression_scores,
)


def box(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------
# gIoU / cIoU


def test_giou_ciou_every_edge_case_by_hand():
    predictions = [
        np.array([[1, 1], [0, 0]], bool),  # I=1, U=3
        None,  # missing prediction -> empty mask: I=0, U=4
        np.zeros((2, 2), bool),  # both empty: U=0 -> scores 1
        [np.array([[1, 0], [0, 0]], bool), np.array([[0, 0], [0, 1]], bool)],  # OR-ed -> exact match: I=2, U=2
        np.array([[1, 0], [0, 0]], bool),  # empty ground truth, non-empty prediction: I=0, U=1
        np.zeros((0, 2, 2), bool),  # an answer with no mask, against a 1-pixel GT: I=0, U=1
    ]
    ground_truths = [
        np.array([[1, 0], [1, 0]], bool),
        np.ones((2, 2), bool),
        np.zeros((2, 2), bool),
        np.array([[1, 0], [0, 1]], bool),
        np.zeros((2, 2), bool),
        np.array([[0, 0], [0, 1]], bool),
    ]
    result = image_referring_metrics(predictions, ground_truths)
    expected_giou = (1 / (3 + 1e-5) + 0 + 1 + 2 / (2 + 1e-5) + 0 + 0) / 6
    expected_ciou = (1 + 0 + 0 + 2 + 0 + 0) / (3 + 4 + 0 + 2 + 1 + 1 + 1e-10)
    assert result.giou == pytest.approx(expected_giou, rel=1e-12)
    assert result.ciou == pytest.approx(expected_ciou, rel=1e-12)
    assert result.intersections.tolist() == [1, 0, 0, 2, 0, 0]
    assert result.unions.tolist() == [3, 4, 0, 2, 1, 1]
    assert result.per_sample_iou[2] == 1.0
    assert result.to_dict() == {"gIoU": result.giou, "cIoU": result.ciou, "n_samples": 6}


def test_several_ground_truth_objects_are_ored():
    truth = np.stack([box((4, 4), (0, 0), (0, 1)), box((4, 4), (3, 3), (2, 3))])  # 2 + 2 pixels
    prediction = box((4, 4), (0, 0), (0, 3))  # 4 pixels, 2 of them on the first object
    result = image_referring_metrics([prediction], [truth])
    assert (result.intersections[0], result.unions[0]) == (2, 6)


def test_all_unions_empty_gives_giou_one_and_ciou_zero():
    giou, ciou, per_sample = giou_ciou_from_counts([0, 0], [0, 0])
    assert giou == 1.0 and ciou == 0.0 and per_sample.tolist() == [1.0, 1.0]


def test_image_metric_errors():
    with pytest.raises(ValueError, match="evaluation set is empty"):
        image_referring_metrics([], [])
    with pytest.raises(ValueError, match="sample 0: mask has shape"):
        image_referring_metrics([np.zeros((3, 3), bool)], [np.zeros((2, 2), bool)])
    with pytest.raises(ValueError, match="must be paired"):
        image_referring_metrics([None], [])
    with pytest.raises(ValueError, match=r"lie in \[0, union\]"):
        giou_ciou_from_counts([3], [2])


# ---------------------------------------------------------------------------------------------------------------
# boundaries


def test_seg2bmap_square_by_hand():
    mask = box((5, 5), (1, 2), (1, 2))
    expected = np.array(
        [
            [1, 1, 1, 0, 0],  # background above the square (and its top-left diagonal) has a foreground S/SE
            [1, 0, 1, 0, 0],  # left background pixel (E is fg), right fg pixel (E is bg)
            [1, 1, 1, 0, 0],  # bottom fg row (S is bg)
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(seg2bmap(mask), expected)


def test_seg2bmap_border_rules():
    # the image border is not a contour
    assert not seg2bmap(np.ones((4, 6), bool)).any()
    # last row compares with the right neighbour only, last column with the bottom one only, the corner never
    corner = np.zeros((5, 5), bool)
    corner[4, 4] = True
    assert set(zip(*np.nonzero(seg2bmap(corner)))) == {(3, 3), (3, 4), (4, 3)}
    np.testing.assert_array_equal(seg2bmap(np.array([[0, 1, 1, 0]], bool)), [[1, 0, 1, 0]])
    # vectorised over leading dimensions
    stack = np.stack([box((5, 5), (1, 2), (1, 2)), corner])
    np.testing.assert_array_equal(seg2bmap(stack), np.stack([seg2bmap(stack[0]), seg2bmap(stack[1])]))


def test_boundary_radius_follows_the_diagonal():
    assert boundary_radius(10, 10) == 1  # 0.008 * 14.1 = 0.11 -> 1
    assert boundary_radius(480, 854) == 8  # 0.008 * 979.6 = 7.84 -> 8
    assert boundary_radius(720, 1280) == 12  # 0.008 * 1468.6 = 11.7 -> 12
    assert boundary_radius(100, 100, bound_th=3) == 3


def test_disk_and_dilation_of_one_pixel():
    np.testing.assert_array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    assert disk(2).sum() == 13  # offsets with dy^2 + dx^2 <= 4
    image = np.zeros((9, 11), bool)
    image[4, 5] = True
    expected = np.zeros_like(image)
    expected[1:8, 2:9] = disk(3)
    np.testing.assert_array_equal(dilate_with_disk(image, 3), expected)
    # near the border the disk is clipped
    image = np.zeros((5, 5), bool)
    image[0, 0] = True
    np.testing.assert_array_equal(dilate_with_disk(image, 2)[:3, :3], disk(2)[2:, 2:])
    assert dilate_with_disk(image, 2).sum() == disk(2)[2:, 2:].sum()


def test_boundary_f_on_shifted_squares_by_hand():
    # 10x10 image: radius ceil(0.008 * 14.14) = 1 (a plus-shaped disk).
    truth = box((10, 10), (2, 5), (2, 5))
    prediction = box((10, 10), (2, 5), (4, 7))  # shifted right by 2
    # Both boundaries are the 16-pixel perimeter of the box one pixel up-left of the square: truth rows 1..5 x cols
    # 1..5, prediction rows 1..5 x cols 3..7. Prediction pixels within distance 1 of the truth perimeter: rows 1
    # and 5 at cols 3..6 (8) and (2, 3), (4, 3) -> precision 10/16. By symmetry: rows 1 and 5 at cols 2..5 and
    # (2, 5), (4, 5) -> recall 10/16.
    precision, recall = boundary_precision_recall(prediction, truth)
    assert precision.tolist() == [10 / 16] and recall.tolist() == [10 / 16]
    assert boundary_f_measure(prediction, truth).tolist() == [pytest.approx(10 / 16)]
    # J: 8 common pixels, union 16 + 16 - 8
    assert jaccard_per_frame(prediction[None], truth[None]).tolist() == [pytest.approx(1 / 3)]


def test_boundary_f_empty_cases():
    square = box((10, 10), (2, 5), (2, 5))
    empty = np.zeros((10, 10), bool)
    full = np.ones((10, 10), bool)
    predictions = np.stack([empty, empty, square, full, square])
    truths = np.stack([empty, square, empty, full, square])
    precision, recall = boundary_precision_recall(predictions, truths)
    assert precision.tolist() == [1, 1, 0, 1, 1]
    assert recall.tolist() == [1, 0, 1, 1, 1]
    assert boundary_f_measure(predictions, truths).tolist() == [1, 0, 0, 1, 1]
    # J: both empty -> 1; one empty -> 0
    assert jaccard_per_frame(predictions, truths).tolist() == [1, 0, 0, 1, 1]
    # the full frame has no boundary by the seg2bmap rule, so an empty prediction of it gets F = 1 but J = 0
    assert boundary_f_measure(empty, full).tolist() == [1.0]
    assert jaccard_per_frame(empty[None], full[None]).tolist() == [0.0]


def _brute_force_f(prediction: np.ndarray, truth: np.ndarray, radius: int) -> float:
    """Independent reference: explicit pixel loops over the boundary rule and the disk distance."""

    def boundary(mask):
        height, width = mask.shape
        out = np.zeros_like(mask)
        for y in range(height):
            for x in range(width):
                neighbours = []
                if y < height - 1 and x < width - 1:
                    neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
                elif y == height - 1 and x < width - 1:
                    neighbours = [(y, x + 1)]
                elif x == width - 1 and y < height - 1:
                    neighbours = [(y + 1, x)]
                out[y, x] = any(mask[n] != mask[y, x] for n in neighbours)
        return out

    def matched(source, target):
        points = np.argwhere(target)
        hits = 0
        for y, x in np.argwhere(source):
            if len(points) and (((points - (y, x)) ** 2).sum(axis=1) <= radius**2).any():
                hits += 1
        return hits

    pb, tb = boundary(prediction), boundary(truth)
    n_p, n_t = pb.sum(), tb.sum()
    if n_p == 0 and n_t == 0:
        return 1.0
    if n_p == 0 or n_t == 0:
        return 0.0
    p, r = matched(pb, tb) / n_p, matched(tb, pb) / n_t
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_boundary_f_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    shape = (23, 31)
    predictions, truths = [], []
    for _ in range(6):
        truth = np.zeros(shape, bool)
        prediction = np.zeros(shape, bool)
        for _ in range(3):
            y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            truth[max(0, y - 3) : y + 4, max(0, x - 5) : x + 3] = True
            prediction[max(0, y - 2 + rng.integers(-2, 3)) : y + 3, max(0, x - 4) : x + 4 + rng.integers(-2, 3)] = True
        prediction ^= rng.random(shape) < 0.03  # speckles
        predictions.append(prediction)
        truths.append(truth)
    predictions, truths = np.stack(predictions), np.stack(truths)
    for bound_th in (0.008, 2, 4):
        radius = boundary_radius(*shape, bound_th=bound_th)
        expected = [_brute_force_f(p, t, radius) for p, t in zip(predictions, truths)]
        np.testing.assert_allclose(boundary_f_measure(predictions, truths, bound_th=bound_th), expected, rtol=1e-12)
        # precision is the share of predicted boundary pixels inside the dilated ground-truth boundary
        precision, _ = boundary_precision_recall(predictions, truths, bound_th=bound_th)
        predicted_boundary, true_boundary = seg2bmap(predictions), seg2bmap(truths)
        via_dilation = (predicted_boundary & dilate_with_disk(true_boundary, radius)).sum(axis=(1, 2)) / np.maximum(
            predicted_boundary.sum(axis=(1, 2)), 1
        )
        np.testing.assert_allclose(precision, via_dilation, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# video: J, F, J&F per expression and over expressions


def test_video_expression_and_aggregate_by_hand():
    empty = np.zeros((10, 10), bool)
    square = box((10, 10), (2, 5), (2, 5))
    shifted = box((10, 10), (2, 5), (4, 7))
    # expression 1: frame 0 both empty (J = F = 1), frame 1 missed object (J = F = 0)
    first = video_expression_scores([empty, empty], [empty, square])
    assert first.j_per_frame.tolist() == [1.0, 0.0] and first.f_per_frame.tolist() == [1.0, 0.0]
    assert (first.j, first.f, first.jf) == (0.5, 0.5, 0.5)
    # expression 2: the shifted squares: J = 1/3, F = 10/16
    second = video_expression_scores(shifted[None], square[None])
    assert second.j == pytest.approx(1 / 3) and second.f == pytest.approx(10 / 16)
    summary = aggregate_video([first, second])
    assert summary.j == pytest.approx((0.5 + 1 / 3) / 2)
    assert summary.f == pytest.approx((0.5 + 10 / 16) / 2)
    assert summary.jf == pytest.approx((summary.j + summary.f) / 2)
    assert summary.to_dict()["n_expressions"] == 2


def test_video_errors():
    with pytest.raises(ValueError, match="no frames"):
        video_expression_scores([], [])
    with pytest.raises(ValueError, match="no frames"):
        video_expression_scores(np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4), bool))
    with pytest.raises(ValueError, match="predictions have shape"):
        video_expression_scores(np.zeros((2, 4, 4), bool), np.zeros((3, 4, 4), bool))
    with pytest.raises(ValueError, match="zero expressions"):
        aggregate_video([])


# ---------------------------------------------------------------------------------------------------------------
# ReVOS A, R and the subset averaging


def test_revos_accuracy_and_robustness_by_hand():
    truth = np.zeros((2, 4, 4), bool)
    truth[:, 0, :2] = True  # 2 referred pixels per frame
    foreground = truth.copy()
    foreground[:, 3, :3] = True  # another object: |fg| = 5
    prediction = truth.copy()
    prediction[0, 2, 2] = True  # frame 0: 1 false positive
    prediction[1, 1:4, :] = True  # frame 1: 12 false positives
    np.testing.assert_allclose(pixel_accuracy_per_frame(prediction, truth), [15 / 16, 4 / 16])
    np.testing.assert_allclose(robustness_per_frame(prediction, truth, foreground), [1 - 1 / (5 + 1e-6), 0.0])
    # an empty foreground: no false positive -> 1, any false positive -> 0
    nothing = np.zeros((1, 4, 4), bool)
    assert robustness_per_frame(nothing, nothing, nothing).tolist() == [1.0]
    assert robustness_per_frame(prediction[:1], nothing, nothing).tolist() == [0.0]
    scores = video_expression_scores(prediction, truth, foreground_frames=foreground)
    assert scores.accuracy == pytest.approx((15 / 16 + 4 / 16) / 2)
    assert scores.robustness == pytest.approx((1 - 1 / (5 + 1e-6)) / 2)


def _scores(j, f, a, r):
    from transformers_maskcma.evaluation.metrics import ExpressionScores

    return ExpressionScores(j=j, f=f, j_per_frame=np.array([j]), f_per_frame=np.array([f]), accuracy=a, robustness=r)


def test_revos_overall_is_the_mean_of_subset_means():
    scores = [_scores(0.2, 0.4, 0.9, 0.5), _scores(0.6, 0.8, 0.7, 0.1), _scores(1.0, 0.0, 0.5, 0.3)]
    result = revos_scores(scores, [0, 0, 1])
    assert result.referring.j == pytest.approx(0.4) and result.referring.f == pytest.approx(0.6)
    assert result.referring.jf == pytest.approx(0.5)
    assert result.referring.accuracy == pytest.approx(0.8) and result.referring.robustness == pytest.approx(0.3)
    assert result.reasoning.j == 1.0 and result.reasoning.jf == 0.5 and result.reasoning.n_expressions == 1
    assert result.overall.j == pytest.approx((0.4 + 1.0) / 2)  # not the mean over the 3 expressions (0.6)
    assert result.overall.f == pytest.approx((0.6 + 0.0) / 2)
    assert result.overall.jf == pytest.approx((0.5 + 0.5) / 2)
    assert result.overall.accuracy == pytest.approx((0.8 + 0.5) / 2)
    assert result.overall.robustness == pytest.approx((0.3 + 0.3) / 2)
    assert result.overall.n_expressions == 3
    as_dict = result.to_dict()
    assert set(as_dict) == {"referring", "reasoning", "overall", "n_excluded"}
    assert as_dict["overall"]["J&F"] == pytest.approx(0.5) and as_dict["n_excluded"] == 0


def test_revos_missing_subset_and_bad_input():
    result = revos_scores([_scores(0.2, 0.4, 0.9, 0.5)], [0])
    assert result.reasoning is None and result.overall is None and result.referring.n_expressions == 1
    with pytest.raises(ValueError, match="all 1 ReVOS expressions have a type_id other than 0"):
        revos_scores([_scores(0.2, 0.4, 0.9, 0.5)], [2])
    with pytest.raises(ValueError, match="lack them"):
        revos_scores([_scores(0.2, 0.4, None, None)], [0])
    with pytest.raises(ValueError, match="must be paired"):
        revos_scores([_scores(0.2, 0.4, 0.9, 0.5)], [0, 1])


def test_revos_type_id_2_is_excluded_and_counted():
    scores = [_scores(0.2, 0.4, 0.9, 0.5), _scores(0.0, 0.0, 0.0, 0.0), _scores(1.0, 0.0, 0.5, 0.3)]
    result = revos_scores(scores, [0, 2, 1])
    assert result.n_excluded == 1
    assert result.referring.j == pytest.approx(0.2) and result.reasoning.j == pytest.approx(1.0)
    assert result.overall.n_expressions == 2 and result.overall.j == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------------------------
# ReVOS: the official scorers' uint8-sum ground truth


def _overlap_clip():
    """Five 8x8 frames, two objects of 2x2 pixels; in frames 0-3 they share one pixel, in frame 4 they do not.
    Returns (object count per pixel, union, foreground = union)."""
    counts = np.zeros((5, 8, 8), dtype=np.uint8)
    for t in range(4):
        counts[t, 2:4, 2:4] += 1
        counts[t, 3:5, 3:5] += 1  # pixel (3, 3) is covered twice
    counts[4, 0:2, 0:2] += 1
    counts[4, 5:7, 5:7] += 1
    return counts, counts > 0


def test_official_revos_a_and_r_on_overlapping_objects_by_hand():
    counts, union = _overlap_clip()
    prediction = union.copy()  # a perfect prediction of the union
    # A: frames 0-3 miss the doubly covered pixel (2 != 1): 63/64; frame 4 agrees everywhere.
    accuracy = official_accuracy_per_frame(prediction, counts)
    np.testing.assert_allclose(accuracy, [63 / 64] * 4 + [1.0])
    # R: in frames 0-3 the predicted overlap pixel gives (1 - 2) mod 256 = 255 false positives against a
    # foreground of 7 pixels: max(1 - 255 / 7, 0) = 0; frame 4 has none: 1.
    robustness = official_robustness_per_frame(prediction, counts, foreground_areas=[7, 7, 7, 7, 8])
    np.testing.assert_allclose(robustness, [0.0] * 4 + [1.0])
    scores = video_expression_scores(prediction, union, foreground_frames=union, ground_truth_counts=counts)
    assert scores.accuracy == pytest.approx(0.9875)  # (4 * 63/64 + 1) / 5: the official 98.75
    assert scores.robustness == pytest.approx(0.2)  # the official 20.0
    assert scores.j == 1.0 and scores.f == 1.0  # J and F binarise the ground truth
    union_rule = video_expression_scores(prediction, union, foreground_frames=union)
    assert union_rule.accuracy == 1.0 and union_rule.robustness == pytest.approx(1.0)  # the union rule: 100 / 100
    assert union_rule.j == scores.j and union_rule.f == scores.f


def test_official_revos_r_wraps_in_uint8_by_hand():
    counts = np.zeros((1, 4, 4), dtype=np.uint8)
    counts[0, 0, 0] = 3  # three objects: (1 - 3) mod 256 = 254
    counts[0, 1, 1] = 1
    prediction = np.zeros((1, 4, 4), dtype=bool)
    prediction[0, 0, 0] = prediction[0, 1, 1] = prediction[0, 2, 2] = True  # 254 + 0 + 1 false positives
    np.testing.assert_allclose(official_robustness_per_frame(prediction, counts, [1000]), [1 - 255 / (1000 + 1e-6)])
    np.testing.assert_allclose(official_accuracy_per_frame(prediction, counts), [14 / 16])  # (0,0) and (2,2) miss
    with pytest.raises(ValueError, match="non-negative integers"):
        official_accuracy_per_frame(prediction, counts.astype(bool))
    with pytest.raises(ValueError, match="must equal the ground-truth masks"):
        video_expression_scores(prediction, np.zeros_like(prediction), ground_truth_counts=counts)
