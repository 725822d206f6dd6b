"""`MaskCMATrainer`: the `transformers.Trainer` for MaskCMA.

The model's forward returns every loss term (`MaskCMAOutput`: `lm_loss`, the weighted `mask_loss` and its parts,
`tmc_loss`); the trainer only weights them for the optimizer step and accumulates (docs/training.md)::

    loss = lm_loss + mask_loss + tmc_weight · tmc_loss,  mask_loss = w_bce·bce + w_dice·dice + w_prior·prior
                                                                    + w_iou·iou + w_obj·object_score

Gradient accumulation and data parallelism are exact for the model's parts: the model averages the LM loss over
the answer tokens and the mask losses over the targets *of the batch it sees*, so a plain average of micro-batch
losses would weight a micro-batch with few targets as much as one with many. The trainer instead counts, for each
optimizer step, the LM tokens and the mask targets of all its micro-batches on all processes
(`get_batch_samples`), and rescales each micro-batch's parts by its share of them. Accumulating two micro-batches
of one sample therefore gives the same gradient as one batch of two samples, and two DDP processes give the same
gradient as one process accumulating their micro-batches.

The TMC loss is a contrastive loss *within one micro-batch on one process* (its negatives are the other objects of
that micro-batch, as in CLIP-style training without a feature queue); the objective uses the mean of the
micro-batch TMC losses over the micro-batches of the step and the processes. It is therefore unchanged between
"DDP with N processes" and "one process accumulating the same N micro-batches", but a batch of two samples has
more negatives than two accumulated batches of one: there, only the model's parts are equal.

Every component is logged through the usual Trainer logging (`lm_loss`, `mask_bce`, `mask_dice`, `prior_loss`,
`iou_loss`, `object_score_loss`, `tmc_loss`, `tmc_skipped_fraction`, `cma_gamma`, `cma_warmup_factor`): each is the
value for the whole optimizer step (all micro-batches, all processes), averaged over the steps since the last log,
exactly like `loss`. γ is gathered from its shard under FSDP and DeepSpeed ZeRO-3 (`sharding.full_scalar_value`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from ..modeling import MaskCMAModel

from .callbacks import GammaWarmupCallback, active_cma, check_float32_master_weights, unwrap_maskcma
from .sharding import full_scalar_value, tied_parameter_names

logger = logging.get_logger(__name__)


@dataclass
class AccumulationCounts:
    """What one optimizer step holds, over all its micro-batches and all processes.

    Args:
        lm_tokens (`float`): answer tokens that carry an LM loss (labels after the causal shift that are not -100).
        mask_targets (`float`): ground-truth masks (targets).
        micro_batches (`int`): micro-batches of the step on each process.
        world_size (`int`): number of processes (gradients are averaged over them by DDP / FSDP / DeepSpeed).
    """

    lm_tokens: float
    mask_targets: float
    micro_batches: int
    world_size: int


def count_lm_tokens(batch: dict) -> int:
    """Label positions that carry an LM loss: `labels[..., 1:] != -100` (the causal LM loss shifts by one)."""
    labels = batch.get("labels")
    if labels is None:
        return 0
    return int((labels[..., 1:] != -100).sum().item())


def count_mask_targets(batch: dict) -> int:
    """Number of ground-truth masks (targets) of a batch."""
    gt_masks = batch.get("gt_masks")
    return 0 if gt_masks is None else int(gt_masks.shape[0])


def _lm_token_count(batch: dict, device: torch.device) -> torch.Tensor:
    """`count_lm_tokens` as an int64 tensor on `device`, without a host synchronisation."""
    labels = batch.get("labels")
    if labels is None:
        return torch.zeros((), dtype=torch.long, device=device)
    return (labels[..., 1:] != -100).sum().to(device)


class MaskCMATrainer(Trainer):
    """`Trainer` with the TMC loss, exact gradient accumulation and per-component logging (module docstring).

    Args:
        tmc_weight (`float`, *optional*): weight of the model's `tmc_loss`; default the model's ``config.tmc_weight``
            (its temperature is ``config.tmc_temperature``).
        cma_warmup (`bool`, defaults to `True`): add a `GammaWarmupCallback` (unless one is already among the
            callbacks) so the CMA warm-up factor follows the step.
        cma_warmup_ratio (`float`, *optional*): its ramp length as a fraction of the steps; default
            ``config.warmup_ratio``.
        *args, **kwargs: the arguments of `transformers.Trainer`. The model may be a `MaskCMAModel` or a peft
            model around one.
    """

    # compute_loss returns a loss already normalised over the whole accumulated batch
    loss_is_scaled_for_ga = True

    LOGGED_COMPONENTS = (
        "lm_loss",
        "mask_bce",
        "mask_dice",
        "prior_loss",
        "iou_loss",
        "object_score_loss",
        "tmc_loss",
        "tmc_skipped_fraction",
    )

    def __init__(
        self,
        *args,
        tmc_weight: float | None = None,
        cma_warmup: bool = True,
        cma_warmup_ratio: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        check_float32_master_weights(self.model, self.args)  # no AdamW on bf16/fp16 weights
        config = unwrap_maskcma(self.model).config
        self.tmc_weight = float(config.tmc_weight if tmc_weight is None else tmc_weight)
        if self.tmc_weight < 0:
            raise ValueError(f"MaskCMATrainer: tmc_weight={self.tmc_weight} must be >= 0")
        if self.args.n_gpu > 1:
            raise ValueError(
                "MaskCMATrainer does not support torch.nn.DataParallel (several GPUs in one process): the model's "
                "outputs have one row per [SEG] and cannot be split by DataParallel. Launch one process per GPU with "
                "`accelerate launch` or `torchrun` (DDP) instead."
            )
        if cma_warmup and not any(isinstance(cb, GammaWarmupCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(GammaWarmupCallback(cma_warmup_ratio))
        self._logged_components = [
            name for name in self.LOGGED_COMPONENTS if name != "prior_loss" or config.use_cma
        ]
        # float32 sums on the training device, read only when logging (no float64: MPS has none)
        self._component_sums: torch.Tensor | None = None
        self._component_last_logged_step: int | None = None
        self._tmc_skipped_count: torch.Tensor | None = None

    # -- counting the accumulated batch ---------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step and count their LM tokens and targets on all processes."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        # int64 counts (exact, and available on every backend), summed on the device: one read per optimizer step
        lm_tokens = torch.zeros((), dtype=torch.long, device=device)
        for batch in batch_samples:
            lm_tokens = lm_tokens + _lm_token_count(batch, device)
        mask_targets = sum(count_mask_targets(batch) for batch in batch_samples)
        counts = torch.stack([lm_tokens, torch.tensor(mask_targets, dtype=torch.long, device=device)])
        world_size = self.accelerator.num_processes
        if world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        total_lm, total_masks = counts.tolist()
        return batch_samples, AccumulationCounts(
            lm_tokens=float(total_lm),
            mask_targets=float(total_masks),
            micro_batches=max(len(batch_samples), 1),
            world_size=world_size,
        )

    # -- the loss -------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: AccumulationCounts | torch.Tensor | int | None = None,
    ):
        """``lm_loss + mask_loss + tmc_weight · tmc_loss`` from the model's terms.

        In training (with the `AccumulationCounts` of `get_batch_samples`), each term is rescaled by its share of the
        optimizer step so that the gradients summed over micro-batches and averaged over processes equal those of the
        whole step's batch (module docstring). Otherwise (evaluation, or a direct call) it is the plain per-batch value.
        """
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError(
                "the model returned no loss: a training batch needs `labels` (LM loss) and/or `gt_masks` with "
                "`sam_pixel_values` (mask losses)"
            )
        zero = outputs.loss.new_zeros(())
        lm = zero if outputs.lm_loss is None else outputs.lm_loss
        mask = zero if outputs.mask_loss is None else outputs.mask_loss
        use_tmc = self.tmc_weight > 0 and outputs.tmc_loss is not None
        tmc = outputs.tmc_loss if use_tmc else zero
        if use_tmc:  # counted on the device; the warning is given when the count is read (logging)
            skipped = outputs.tmc_skipped.long()
            self._tmc_skipped_count = skipped if self._tmc_skipped_count is None else self._tmc_skipped_count + skipped

        counts = num_items_in_batch if isinstance(num_items_in_batch, AccumulationCounts) else None
        if counts is None or not model.training:
            loss = lm + mask + self.tmc_weight * tmc
            if model.training:  # a direct training call without counts: plain mean over accumulation steps
                loss = loss / max(getattr(self, "current_gradient_accumulation_steps", 1), 1)
        else:
            lm_share = self._share(_lm_token_count(inputs, outputs.loss.device), counts.lm_tokens)
            mask_share = self._share(count_mask_targets(inputs), counts.mask_targets)
            tmc_share = 1.0 / (counts.micro_batches * counts.world_size)
            # DDP averages gradients over processes; the shares already sum to one over them, so undo the average
            loss = counts.world_size * (lm * lm_share + mask * mask_share + self.tmc_weight * tmc * tmc_share)
            self._record_components(outputs, use_tmc, lm_share, mask_share, tmc_share)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _share(local: int | torch.Tensor, total: float) -> float | torch.Tensor:
        if isinstance(local, torch.Tensor):  # stays on the device (no synchronisation)
            return local.float() / total if total > 0 else local.float() * 0.0
        return float(local) / total if total > 0 else 0.0

    @property
    def tmc_skipped_micro_batches(self) -> int:
        """Micro-batches whose TMC loss was skipped (fewer than two visible objects) since training began. Reading
        it synchronises with the device."""
        return 0 if self._tmc_skipped_count is None else int(self._tmc_skipped_count)

    # -- logging --------------------------------------------------------------------------------------------------

    def _record_components(self, outputs, use_tmc: bool, lm_share, mask_share, tmc_share: float):
        """Add this micro-batch's weighted components to the running sums, on the device (no synchronisation)."""

        def weighted(value, share):
            return None if value is None else value.detach().float() * share

        device = outputs.loss.device
        values = {
            "lm_loss": weighted(outputs.lm_loss, lm_share),
            "mask_bce": weighted(outputs.mask_bce, mask_share),
            "mask_dice": weighted(outputs.mask_dice, mask_share),
            "prior_loss": weighted(outputs.prior_loss, mask_share),
            "iou_loss": weighted(outputs.iou_loss, mask_share),
            "object_score_loss": weighted(outputs.object_score_loss, mask_share),
            "tmc_loss": weighted(outputs.tmc_loss, tmc_share) if use_tmc else None,
            "tmc_skipped_fraction": weighted(outputs.tmc_skipped, tmc_share) if use_tmc else None,
        }
        if self._component_last_logged_step is None:
            self._component_last_logged_step = self.state.global_step
        zero = torch.zeros((), dtype=torch.float32, device=device)
        step = torch.stack([zero if values[name] is None else values[name].to(device) for name in self._logged_components])
        self._component_sums = step if self._component_sums is None else self._component_sums + step

    def component_logs(self) -> dict[str, float]:
        """The mean per-step value of every loss component since the last log, over all processes, and the current
        γ and warm-up factor. Resets the running sums. Collective: call it on every process."""
        last = self._component_last_logged_step
        steps = 0 if last is None else self.state.global_step - last
        if self._component_sums is None:
            sums = torch.zeros(len(self._logged_components), dtype=torch.float32, device=self.args.device)
        else:
            sums = self._component_sums.to(self.args.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        logs: dict[str, float] = {}
        if steps > 0:
            logs = {name: float(value) / steps for name, value in zip(self._logged_components, sums.tolist())}
        self._component_sums = None
        if self.tmc_skipped_micro_batches > 0:
            logger.warning_once(
                "TMC loss skipped: a micro-batch had fewer than two distinct objects with a visible mask (the loss is "
                "0 for it; `tmc_skipped_fraction` in the logs says how often). Use larger micro-batches or samples "
                "with several objects for the contrastive loss to act."
            )
        self._component_last_logged_step = self.state.global_step
        logs["cma_gamma"] = self.cma_gamma()
        logs["cma_warmup_factor"] = float(active_cma(self.model).warmup_factor)
        return logs

    def cma_gamma(self) -> float:
        """The learned γ of the CMA that runs, gathered from its shard under FSDP and DeepSpeed ZeRO-3
        (`sharding.full_scalar_value`). Collective: call it on every process."""
        fsdp1 = bool(self.is_fsdp_enabled) and not getattr(self.accelerator, "is_fsdp2", False)
        return full_scalar_value(active_cma(self.model).gamma, fsdp1_view=fsdp1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss components to the training logs (those with a ``loss`` entry)."""
        if "loss" in logs:
            logs = {**logs, **self.component_logs()}
        super().log(logs, start_time)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save a plain `MaskCMAModel` with its in-memory parameter names (``save_original_format=False``).

        `save_pretrained` by default renames the VLM's weights back to its original checkpoint layout, which
        `Trainer` cannot load when resuming (it reads the state dict as is). `MaskCMAModel.from_pretrained` loads
        both layouts. Peft models are saved by `Trainer` as usual (their adapters)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, MaskCMAModel):
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume the weights: a peft model's adapter is loaded strictly (`lora.load_adapter_strict`: the LoRA
        matrices, every `modules_to_save` copy and the trained token rows, missing or unexpected keys are an error
        naming them); a plain model goes through `Trainer`'s loading with `_issue_warnings_after_load` raising."""
        from peft import PeftModel

        from .lora import load_adapter_strict

        target = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(target, keep_torch_compile=False)
        if isinstance(unwrapped, PeftModel):
            adapter_names = list(unwrapped.peft_config)
            if len(adapter_names) != 1:
                raise ValueError(
                    f"resuming a peft model with several adapters ({adapter_names}) is not supported; train one "
                    "adapter per run"
                )
            load_adapter_strict(unwrapped, resume_from_checkpoint, adapter_names[0])
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end` for a peft model: the best checkpoint's adapter, loaded strictly."""
        from peft import PeftModel

        from .lora import load_adapter_strict

        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(unwrapped, PeftModel) and self.state.best_model_checkpoint:
            load_adapter_strict(unwrapped, self.state.best_model_checkpoint, list(unwrapped.peft_config)[0])
            return
        super()._load_best_model()

    def _issue_warnings_after_load(self, load_result) -> None:
        """Resuming must restore every weight: raise (instead of warning) on missing or unexpected keys, except
        parameters that are tied to a saved one (the LM head of a tied-embedding LLM)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        tied = tied_parameter_names(model)
        missing = [key for key in load_result.missing_keys if key not in tied]
        unexpected = list(load_result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}. "
                "Resume with the same model (and LoRA) settings the checkpoint was trained with."
            )

    # -- evaluation -----------------------------------------------------------------------------------------------

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """Evaluation loss only (model loss + weighted TMC); the masks are scored by `maskcma evaluate`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


__all__ = ["AccumulationCounts", "MaskCMATrainer", "count_lm_tokens", "count_mask_targets"]
