"""Folders saved before the CMA switches became `cma_config` (flat `cma_*` fields, `seg_proj` with a trailing
`Dropout(0.0)`) load strictly and compute what the code of that time computed (tests/fixtures/saved_before_variants,
made by tests/fixtures/make_saved_before_variants.py at commit 661a17b)."""

from pathlib import Path

import pytest
import torch

from transformers_maskcma import MaskCMAModel
from transformers_maskcma.modeling import TextToVisualAttention, VisualToTextAttention
from transformers_maskcma.modeling.mask_prior import ConvHeadMaskPrior, PredictedMaskPrior

FIXTURES = Path(__file__).parent / "fixtures" / "saved_before_variants"
EXPECTED_CLASSES = {
    "defaults": (VisualToTextAttention, PredictedMaskPrior, "output", "residual", 2),
    "paper": (TextToVisualAttention, ConvHeadMaskPrior, "attention", "mask", None),
}


def sam_pixel_values(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """The fixture's SAM2 input: each coarse value repeated over a square block (as the fixture script did)."""
    factor = size // coarse.shape[-1]
    return coarse.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_folder_saved_before_the_change_loads_strictly_with_equal_outputs(name, attn_implementation):
    folder = FIXTURES / name
    model, info = MaskCMAModel.from_pretrained(
        folder, attn_implementation=attn_implementation, output_loading_info=True
    )
    assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    attention_class, prior_class, gate, warmup_target, top_k = EXPECTED_CLASSES[name]
    assert type(model.cma) is attention_class and type(model.mask_prior) is prior_class
    assert (model.config.cma_config.gate, model.config.cma_config.warmup_target) == (gate, warmup_target)
    assert model.config.cma_topk_tokens == top_k and model.cma.top_k == top_k
    assert model.cma.gamma.item() == 0.5  # the CMA acts: the comparison covers it
    assert not any(isinstance(module, torch.nn.Dropout) for module in model.seg_proj)

    saved = torch.load(folder / "expected.pt")
    inputs = dict(saved["inputs"])
    size = model.config.sam2_config.image_size
    inputs["sam_pixel_values"] = sam_pixel_values(inputs.pop("coarse_sam_pixel_values"), size)
    with torch.no_grad():
        output = model.eval()(**inputs)
    # the total loss gained SAM2's IoU and object-score terms and the TMC term (moved from the trainer into the
    # forward) after these folders were saved; the rest is unchanged
    config = model.config
    head_losses = config.iou_loss_weight * output.iou_loss + config.object_score_loss_weight * output.object_score_loss
    head_losses = head_losses + config.tmc_weight * output.tmc_loss
    for field, expected in saved["expected"].items():
        value = output.loss - head_losses if field == "loss" else getattr(output, field)
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-4, msg=field)
