"""gIoU and cIoU for referring image segmentation, as an `evaluate` metric.

Load it offline with ``evaluate.load(path_to_this_folder)`` or
``transformers_maskcma.evaluation.metrics.load_metric("referring_iou")``. The arithmetic lives in the installed
``transformers_maskcma`` package (``evaluate`` copies this script into its cache, so it imports the package by
its absolute name).
"""

import datasets
import evaluate
import numpy as np

from transformers_maskcma.evaluation.metrics import image_referring_metrics


_CITATION = """\
@inproceedings{lai2024lisa,
  title={LISA: Reasoning Segmentation via Large Language Model},
  author={Lai, Xin and Tian, Zhuotao and Chen, Yukang and Li, Yanwei and Yuan, Yuhui and Liu, Shu and Jia, Jiaya},
  booktitle={CVPR},
  year={2024}
}
"""

_DESCRIPTION = """\
Referring image segmentation scores. For sample i with intersection I_i and union U_i (pixels) between the
predicted and the ground-truth mask: gIoU = mean_i g_i with g_i = I_i / (U_i + 1e-5), and g_i = 1 when U_i = 0;
cIoU = sum_i I_i / (sum_i U_i + 1e-10). Several masks of one answer must be OR-ed into one mask before adding
them; a missing prediction is an all-zero mask.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of binary masks of shape (height, width), one per referring sentence.
    references: list of binary ground-truth masks of shape (height, width), same order and sizes.
Returns:
    gIoU: mean per-sample IoU in [0, 1].
    cIoU: cumulative IoU in [0, 1].
    n_samples: number of samples.
Examples:
    >>> metric = evaluate.load("path/to/referring_iou")
    >>> metric.compute(predictions=[[[1, 0], [0, 0]]], references=[[[1, 1], [0, 0]]])
    {'gIoU': 0.49999..., 'cIoU': 0.49999..., 'n_samples': 1}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringIoU(evaluate.Metric):
    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("bool")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
            reference_urls=["https://github.com/dvlab-research/LISA"],
        )

    def _compute(self, predictions, references):
        results = image_referring_metrics(
            [np.asarray(mask, dtype=bool) for mask in predictions],
            [np.asarray(mask, dtype=bool) for mask in references],
        )
        return results.to_dict()
