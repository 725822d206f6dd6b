"""Worker of tests/test_fsdp.py: `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR` (gloo, CPU).

Every process trains two copies of the tiny model for two optimizer steps with `MaskCMATrainer`'s own pieces
(`get_batch_samples` counting, `compute_loss`, `component_logs`, `cma_gamma`, the export of `sharding.py`):

- the reference: unsharded, one process accumulating both processes' micro-batches (the same on every process);
- the FSDP2 copy: each LLM decoder layer and the whole model wrapped with `torch.distributed.fsdp.fully_shard`,
  one micro-batch per process.

After step 1 the sharded model and optimizer are saved with `torch.distributed.checkpoint` (sharded), the full
model is exported through `export_final_model`, and a third copy (different initial weights) is restored from the
checkpoint and runs step 2. Then a LoRA model (peft around the tiny model, sharded the same way) takes one step
sharded and one unsharded, and its export (merged) is compared with `merge_lora` of the unsharded one. Rank 0 writes what it measured to OUTPUT_DIR/results.json; the test compares.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from transformers import TrainingArguments

from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
from transformers_maskcma.modeling import MaskCMAModel
from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor
from transformers_maskcma.tiny import build_tiny_model
from transformers_maskcma.trainer.callbacks import set_warmup_factor
from transformers_maskcma.trainer.collator import MaskCMADataCollator
from transformers_maskcma.trainer.data import ProcessedRecords
from transformers_maskcma.trainer.lora import apply_lora, default_lora_config, merge_lora
from transformers_maskcma.trainer.sharding import export_final_model, full_scalar_value, meta_copy
from transformers_maskcma.trainer.trainer import AccumulationCounts, MaskCMATrainer, count_lm_tokens, count_mask_targets

LR = 0.05


def new_model(seed: int) -> MaskCMAModel:
    model, _ = build_tiny_model(seed=seed)
    set_warmup_factor(model, 1.0)  # γ gets a gradient from the first step
    model.train()
    return model


def shard(model: MaskCMAModel) -> MaskCMAModel:
    """FSDP2 as accelerate's TRANSFORMER_BASED_WRAP does it: every LLM decoder layer, then the root."""
    for layer in model.vlm.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def optimizer_for(model: MaskCMAModel) -> torch.optim.Optimizer:
    # momentum: the optimizer has a state that resuming must restore
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sharded_step(trainer, model, optimizer, batch) -> tuple[float, dict, AccumulationCounts]:
    """One optimizer step of this process's micro-batch; returns the step loss (mean over processes, as `Trainer`
    logs it), the full gradients and the counts."""
    batches, counts = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    optimizer.zero_grad()
    loss = trainer.compute_loss(model, batches[0], num_items_in_batch=counts)
    loss.backward()
    gradients = {name: full(p.grad).detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    step_loss = loss.detach().clone()
    dist.all_reduce(step_loss)
    return float(step_loss) / dist.get_world_size(), gradients, counts


def reference_step(trainer, model, optimizer, batches) -> tuple[float, dict, AccumulationCounts]:
    """The same step in one process accumulating every process's micro-batch (counts computed here)."""
    counts = AccumulationCounts(
        lm_tokens=float(sum(count_lm_tokens(b) for b in batches)),
        mask_targets=float(sum(count_mask_targets(b) for b in batches)),
        micro_batches=len(batches),
        world_size=1,
    )
    optimizer.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=counts)
        loss.backward()
        total += float(loss.detach())
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return total, gradients, counts


def max_difference(first: dict, second: dict) -> tuple[float, float]:
    """Largest absolute and largest relative (to the reference's norm) difference over tensors of both dicts."""
    assert first.keys() == second.keys(), sorted(set(first) ^ set(second))[:10]
    absolute = max(float((full(first[k]) - second[k]).abs().max()) for k in first)
    relative = max(float((full(first[k]) - second[k]).norm() / (second[k].norm() + 1e-12)) for k in first)
    return absolute, relative


def reference_components(trainer) -> dict:
    """The reference trainer's component sums for the last step, read locally (its `component_logs` would sum
    them over processes, and every process holds the same reference)."""
    values = dict(zip(trainer._logged_components, trainer._component_sums.tolist()))
    trainer._component_sums.zero_()
    return values


def lora_model(seed: int):
    """The tiny model with small LoRA adapters (the recipe's targets and trained modules, r = 4)."""
    model = new_model(seed)
    torch.manual_seed(seed)  # the adapters' initial values
    return apply_lora(model, default_lora_config(model, r=4, lora_alpha=8, lora_dropout=0.0))


def lora_export(args, processor, batches, output_dir: str) -> dict:
    """LoRA under FSDP2: one step sharded and one unsharded, then the export (gathered PeftModel state → strict load
    into a meta copy with the same adapters → `merge_lora` → save) against `merge_lora` of the unsharded model."""
    reference = lora_model(0)
    sharded = lora_model(0)
    export_copy = meta_copy(sharded.get_base_model())
    ref_trainer = MaskCMATrainer(model=reference, args=args, tmc_weight=0.1, cma_warmup=False)
    trainer = MaskCMATrainer(model=sharded, args=args, tmc_weight=0.1, cma_warmup=False)
    shard(sharded.get_base_model())
    rank = dist.get_rank()
    _, ref_gradients, _ = reference_step(ref_trainer, reference, optimizer_for(reference), batches[0])
    _, gradients, _ = sharded_step(trainer, sharded, optimizer_for(sharded), batches[0][rank])
    lora_moved = [n for n, p in reference.named_parameters() if "lora_B" in n and float(p.detach().abs().max()) > 0]
    folder = os.path.join(output_dir, "lora_model")
    torch.manual_seed(0)
    copy = apply_lora(export_copy, default_lora_config(export_copy, r=4, lora_alpha=8, lora_dropout=0.0))
    export_final_model(trainer, copy, processor, folder, merge=merge_lora)
    result = {"grad_diff": max_difference(gradients, ref_gradients), "lora_B_trained": len(lora_moved)}
    if rank == 0:
        merged = merge_lora(reference).eval()
        loaded, info = MaskCMAModel.from_pretrained(folder, output_loading_info=True)
        loaded.eval()
        with torch.no_grad():
            expected, got = merged(**batches[1][0]), loaded(**batches[1][0])
        result.update(
            loading_info={k: sorted(map(str, v)) for k, v in info.items()},
            lora_names=[n for n, _ in loaded.named_parameters() if "lora" in n],
            logits_diff=float((got.logits - expected.logits).abs().max()),
            masks_diff=float((got.pred_masks - expected.pred_masks).abs().max()),
        )
    return result


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, ddp_backend="gloo", report_to=[], remove_unused_columns=False,
        per_device_train_batch_size=1,
    )
    rank, world = args.process_index, args.world_size
    assert world == 2 and dist.is_initialized()

    model, tokenizer = build_tiny_model(seed=0)
    processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
    records = generate_synthetic(4, SyntheticConfig(video_fraction=0.0, multi_object_fraction=0.5, seed=9),
                                 show_progress=False)
    dataset = ProcessedRecords(records, processor)
    collator = MaskCMADataCollator(processor)
    # step s, process r: sample 2 s + r
    batches = [[collator([dataset[2 * step + r]]) for r in range(world)] for step in range(2)]

    reference = new_model(0)
    sharded = new_model(0)
    export_copy = meta_copy(sharded)  # built before sharding, as `maskcma train` does
    ref_trainer = MaskCMATrainer(model=reference, args=args, tmc_weight=0.1, cma_warmup=False)
    trainer = MaskCMATrainer(model=sharded, args=args, tmc_weight=0.1, cma_warmup=False)
    shard(sharded)
    ref_optimizer, optimizer = optimizer_for(reference), optimizer_for(sharded)
    results: dict = {"steps": []}

    for step in range(2):
        if step == 1:
            # save after step 1: sharded model + optimizer (torch.distributed.checkpoint), and the full export
            checkpoint = os.path.join(output_dir, "checkpoint-1")
            dcp.save({"model": get_model_state_dict(sharded), "optim": get_optimizer_state_dict(sharded, optimizer)},
                     checkpoint_id=checkpoint)
            export_final_model(trainer, export_copy, processor, os.path.join(output_dir, "model"))
            sharded.eval()
            with torch.no_grad():
                eval_batch = batches[0][0]
                sharded_out = sharded(**eval_batch)
            sharded.train()
            if rank == 0:
                loaded, info = MaskCMAModel.from_pretrained(os.path.join(output_dir, "model"), output_loading_info=True)
                loaded.eval()
                with torch.no_grad():
                    loaded_out = loaded(**eval_batch)
                results["export"] = {
                    "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
                    "logits_diff": float((loaded_out.logits - sharded_out.logits).abs().max()),
                    "masks_diff": float((loaded_out.pred_masks - sharded_out.pred_masks).abs().max()),
                    "loss_diff": float((loaded_out.loss - sharded_out.loss).abs()),
                    "params_vs_reference": max_difference(
                        {n: p.detach() for n, p in loaded.named_parameters()},
                        {n: p.detach() for n, p in reference.named_parameters()},
                    ),
                }
            # resume: a model with other initial weights, restored from the sharded checkpoint
            resumed = shard(new_model(1))
            resumed_optimizer = optimizer_for(resumed)
            state = {"model": get_model_state_dict(resumed),
                     "optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
            dcp.load(state, checkpoint_id=checkpoint)
            set_model_state_dict(resumed, state["model"])
            set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
            resumed_trainer = MaskCMATrainer(model=resumed, args=args, tmc_weight=0.1, cma_warmup=False)

        ref_loss, ref_gradients, ref_counts = reference_step(ref_trainer, reference, ref_optimizer, batches[step])
        loss, gradients, counts = sharded_step(trainer, sharded, optimizer, batches[step][rank])
        for t in (ref_trainer, trainer):
            t.state.global_step = step + 1
        logs = trainer.component_logs()  # collective: sums over processes, γ gathered from its shard
        ref_logs = reference_components(ref_trainer)
        gamma_local = sharded.cma.gamma.to_local().numel()
        gamma_holders = torch.tensor([float(gamma_local)])
        dist.all_reduce(gamma_holders)
        entry = {
            "loss": loss, "ref_loss": ref_loss,
            "counts": [counts.lm_tokens, counts.mask_targets],
            "ref_counts": [ref_counts.lm_tokens, ref_counts.mask_targets],
            "grad_diff": max_difference(gradients, ref_gradients),
            "param_diff": max_difference({n: p.detach() for n, p in sharded.named_parameters()},
                                         {n: p.detach() for n, p in reference.named_parameters()}),
            "logs": logs, "ref_logs": ref_logs, "ref_gamma": float(reference.cma.gamma.detach()),
            "gamma_local_numel": gamma_local, "gamma_elements_over_processes": float(gamma_holders),
        }
        if step == 1:
            resumed_loss, resumed_gradients, _ = sharded_step(resumed_trainer, resumed, resumed_optimizer,
                                                              batches[step][rank])
            entry["resumed_loss"] = resumed_loss
            entry["resumed_grad_diff"] = max_difference(resumed_gradients, gradients)
            entry["resumed_param_diff"] = max_difference(
                {n: full(p.detach()) for n, p in resumed.named_parameters()},
                {n: full(p.detach()) for n, p in sharded.named_parameters()},
            )
        gathered = [None] * world
        dist.all_gather_object(gathered, entry)
        results["steps"].append(gathered)

    results["lora"] = lora_export(args, processor, batches, output_dir)

    # FSDP1 presents γ as a view that is empty on the processes that do not hold it: summed over processes
    view = torch.tensor([3.5]) if rank == 0 else torch.zeros(0)
    fsdp1_values = [None] * world
    dist.all_gather_object(fsdp1_values, full_scalar_value(view, fsdp1_view=True))
    results["fsdp1_view_values"] = fsdp1_values
    if rank == 0:
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
