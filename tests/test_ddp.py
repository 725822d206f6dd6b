"""Two DDP processes (gloo, CPU) train exactly like one process accumulating the same micro-batches; with a wrong
loss scaling (the Trainer's default: each micro-batch's own mean) they do not, so the comparison can fail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from transformers_maskcma.tiny import build_tiny_model

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from transformers import TrainingArguments
    from transformers_maskcma.data.synthetic import SyntheticConfig, generate_synthetic
    from transformers_maskcma.processing.processing_maskcma import MaskCMAProcessor
    from transformers_maskcma.tiny import build_tiny_model
    from transformers_maskcma.trainer.collator import MaskCMADataCollator
    from transformers_maskcma.trainer.data import ProcessedRecords
    from transformers_maskcma.trainer.trainer import MaskCMATrainer

    class PlainMeanTrainer(MaskCMATrainer):
        # the negative control: every micro-batch's own mean loss, averaged over micro-batches and processes (the
        # Trainer's default normalisation), instead of the step's token and target counts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

    def run(output_dir, accumulation, plain_mean=False):
        torch.set_num_threads(1)
        model, tokenizer = build_tiny_model(seed=0, warmup_ratio=0.5)
        processor = MaskCMAProcessor.from_model_config(model.config, tokenizer)
        config = SyntheticConfig(video_fraction=0.0, multi_object_fraction=0.5, seed=9)
        dataset = ProcessedRecords(generate_synthetic(4, config, show_progress=False), processor)
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
            max_steps=2, learning_rate=0.05, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
        )
        trainer_class = PlainMeanTrainer if plain_mean else MaskCMATrainer
        trainer = trainer_class(model=model, args=args, train_dataset=dataset,
                                 data_collator=MaskCMADataCollator(processor), tmc_weight=0.1)
        trainer.train()
        if trainer.is_world_process_zero():
            torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                       os.path.join(output_dir, "params.pt"))
            with open(os.path.join(output_dir, "log.json"), "w") as handle:
                json.dump(trainer.state.log_history, handle)

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]), plain_mean=len(sys.argv) > 3 and sys.argv[3] == "plain_mean")
    """
)


def _run(command: list[str], env: dict, timeout: float = 240) -> tuple[int, str]:
    """Run a command in its own process group; on a timeout, kill the whole group (torchrun's workers too)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{command[:4]} did not finish in {timeout} s: {stderr[-2000:]}")
    return process.returncode, stderr


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_accumulation(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    single, ddp, plain = tmp_path / "single", tmp_path / "ddp", tmp_path / "plain_mean"
    for folder in (single, ddp, plain):
        folder.mkdir()

    def torchrun(*args):
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args,
        ]  # fmt: skip

    for command in (
        [sys.executable, str(script), str(single), "2"],
        torchrun(str(ddp), "1"),
        torchrun(str(plain), "1", "plain_mean"),
    ):
        returncode, stderr = _run(command, env)
        assert returncode == 0, stderr[-4000:]

    single_params = torch.load(single / "params.pt")
    ddp_params = torch.load(ddp / "params.pt")
    model, _ = build_tiny_model(seed=0)
    initial = dict(model.named_parameters())
    assert single_params.keys() == ddp_params.keys()
    moved = 0
    for name, value in single_params.items():
        torch.testing.assert_close(ddp_params[name], value, rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(value, initial[name].detach()))
    assert moved > 50  # training changed the weights, so the comparison means something

    single_log = [entry for entry in json.loads((single / "log.json").read_text()) if "loss" in entry]
    ddp_log = [entry for entry in json.loads((ddp / "log.json").read_text()) if "loss" in entry]
    assert len(single_log) == len(ddp_log) == 2
    for one, two in zip(single_log, ddp_log):
        for key in ("loss", "lm_loss", "mask_bce", "mask_dice", "tmc_loss", "tmc_skipped_fraction", "cma_warmup_factor"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key

    # negative control: the same DDP run with the Trainer's default loss scaling lands elsewhere, far outside the
    # tolerance above (the two processes' micro-batches hold different numbers of targets and answer tokens)
    plain_params = torch.load(plain / "params.pt")
    failing = []
    for name, value in single_params.items():
        try:
            torch.testing.assert_close(plain_params[name], value, rtol=1e-4, atol=1e-6)
        except AssertionError:
            failing.append(name)
    assert len(failing) > 10, failing
