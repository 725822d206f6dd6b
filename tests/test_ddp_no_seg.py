"""A micro-batch without ``[SEG]`` still uses every trainable module (with weight 0), so DDP runs with
`find_unused_parameters=False` when one process's micro-batch has no ``[SEG]`` and another's has."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch

from model_inputs import make_batch
from test_ddp import _free_port, _run
from transformers_maskcma.tiny import build_tiny_model


@pytest.mark.parametrize("config", [{}, {"mask_source": "conv"}])
def test_batch_without_seg_touches_every_trainable_module_with_zero_gradient(config):
    model, tokenizer = build_tiny_model(seed=0, **config)
    model.train()
    batch = make_batch(tokenizer, ["Please segment the red circle."], ["There is none."], num_masks=0)
    out = model(**batch)
    assert out.pred_masks.shape[0] == 0 and out.iou_scores.shape == (0,)
    lm_only = model.vlm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    ).loss
    torch.testing.assert_close(out.loss, lm_only)  # the zero-weighted pass changes nothing
    out.loss.backward()
    untouched = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert untouched == []
    for name in ("cma", "sam2.mask_decoder.transformer", "prior_head"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name) and p.requires_grad]
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), name


WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from model_inputs import make_batch
    from transformers_maskcma.tiny import build_tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer = build_tiny_model(seed=0)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with_seg = make_batch(tokenizer, ["Please segment the red circle."], ["Sure, [SEG]."], seed=1)
    without_seg = make_batch(tokenizer, ["Please segment the red circle."], ["There is none."], num_masks=0, seed=2)
    for step in range(3):  # DDP raises at the next step when a step left a parameter unused
        batch = with_seg if (rank + step) % 2 == 0 else without_seg
        optimizer.zero_grad()
        ddp(**batch).loss.backward()
        optimizer.step()
    # the processes stayed in step: identical weights
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    if rank == 0:
        open(sys.argv[1], "w").write("DDP-OK")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_survives_a_micro_batch_without_seg(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    marker = tmp_path / "ok.txt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(marker), tests_dir,
    ]  # fmt: skip
    returncode, stderr = _run(command, env, timeout=180)
    assert returncode == 0, stderr[-4000:]
    assert marker.read_text() == "DDP-OK"
