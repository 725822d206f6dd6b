"""J, F and J&F for referring video segmentation (MeViS / Ref-DAVIS17 / ReVOS protocol), as an `evaluate` metric.

Load it offline with ``evaluate.load(path_to_this_folder)`` or
``transformers_maskcma.evaluation.metrics.load_metric("video_jf")``. The arithmetic lives in the installed
``transformers_maskcma`` package (``evaluate`` copies this script into its cache, so it imports the package by
its absolute name).
"""

import datasets
import evaluate
import numpy as np

from transformers_maskcma.evaluation.metrics import BOUNDARY_THRESHOLD, aggregate_video, video_expression_scores


_CITATION = """\
@inproceedings{ding2023mevis,
  title={MeViS: A Large-scale Benchmark for Video Segmentation with Motion Expressions},
  author={Ding, Henghui and Liu, Chang and He, Shuting and Jiang, Xudong and Loy, Chen Change},
  booktitle={ICCV},
  year={2023}
}
"""

_DESCRIPTION = """\
Referring video segmentation scores. Per expression: J = mean over all frames of the IoU (1 when both masks of a
frame are empty), F = mean over all frames of the boundary F-measure (BSDS seg2bmap boundaries matched within a
disk of radius ceil(0.008 * image diagonal); 1 when both boundaries are empty, 0 when exactly one is). Over the
dataset: J and F are the means over expressions and J&F = (J + F) / 2.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list over expressions of binary masks of shape (num_frames, height, width), the union of the
        answer's objects in each frame.
    references: list over expressions of binary ground-truth masks of the same shapes.
    bound_th: boundary tolerance as a fraction of the image diagonal (default 0.008; >= 1 means pixels).
Returns:
    J, F, J&F in [0, 1], and n_expressions.
Examples:
    >>> metric = evaluate.load("path/to/video_jf")
    >>> metric.compute(predictions=[[[[0, 0], [0, 0]]]], references=[[[[0, 0], [0, 0]]]])
    {'J': 1.0, 'F': 1.0, 'J&F': 1.0, 'n_expressions': 1}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VideoJF(evaluate.Metric):
    def _info(self):
        clip = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("bool"))))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": clip, "references": clip}),
            reference_urls=["https://github.com/henghuiding/MeViS"],
        )

    def _compute(self, predictions, references, bound_th=BOUNDARY_THRESHOLD):
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
        scores = [
            video_expression_scores(np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool), bound_th=bound_th)
            for prediction, reference in zip(predictions, references)
        ]
        return aggregate_video(scores).to_dict()
