"""The local `evaluate` modules load offline and give the same numbers as the numpy functions."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from transformers_maskcma.evaluation.metrics import (  # noqa: E402
    aggregate_video,
    image_referring_metrics,
    load_metric,
    metric_module_path,
    video_expression_scores,
)


def random_masks(rng, shape, density):
    return rng.random(shape) < density


def test_referring_iou_module_equals_numpy():
    rng = np.random.default_rng(1)
    sizes = [(6, 7), (9, 5), (4, 4), (8, 8)]
    predictions = [random_masks(rng, size, 0.4) for size in sizes]
    references = [random_masks(rng, size, 0.4) for size in sizes]
    references[2][:] = False  # an empty ground truth
    predictions[2][:] = False  # ... and an empty prediction: U = 0
    expected = image_referring_metrics(predictions, references)

    module = evaluate.load(str(metric_module_path("referring_iou").parent), keep_in_memory=True)
    result = module.compute(predictions=predictions, references=references)
    assert result == {"gIoU": expected.giou, "cIoU": expected.ciou, "n_samples": 4}

    # the same through add_batch and the package helper
    module = load_metric("referring_iou", keep_in_memory=True)
    module.add_batch(predictions=predictions[:2], references=references[:2])
    module.add_batch(predictions=predictions[2:], references=references[2:])
    assert module.compute() == result


def test_video_jf_module_equals_numpy():
    rng = np.random.default_rng(2)
    shapes = [(3, 10, 12), (2, 9, 9), (4, 20, 16)]
    predictions = [random_masks(rng, shape, 0.3) for shape in shapes]
    references = [random_masks(rng, shape, 0.3) for shape in shapes]
    references[1][0] = False
    predictions[1][0] = False  # a frame where both are empty
    expected = aggregate_video([video_expression_scores(p, r) for p, r in zip(predictions, references)])

    module = load_metric("video_jf", keep_in_memory=True)
    result = module.compute(predictions=predictions, references=references)
    assert result == {"J": expected.j, "F": expected.f, "J&F": expected.jf, "n_expressions": 3}

    # the boundary tolerance is passed through
    module = evaluate.load(str(metric_module_path("video_jf")), keep_in_memory=True)
    wide = aggregate_video([video_expression_scores(p, r, bound_th=3) for p, r in zip(predictions, references)])
    assert module.compute(predictions=predictions, references=references, bound_th=3)["F"] == wide.f
    assert wide.f != expected.f


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="unknown metric 'miou'; the package ships referring_iou, video_jf"):
        load_metric("miou")
