"""FSDP2 (`torch.distributed.fsdp.fully_shard`, gloo, CPU): two sharded processes train exactly like one unsharded
process accumulating their micro-batches, γ is logged from its shard, the full state exports strictly and resumes,
and a LoRA model exports its merged weights.

accelerate enables FSDP only on GPU-like devices, so this runs `MaskCMATrainer`'s own pieces around a model sharded
by hand (tests/fsdp_worker.py); the full `maskcma train` + `accelerate launch` FSDP path is tests/gpu/run_sharded.sh.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_ddp import _free_port, _run

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(output),
    ]
    returncode, stderr = _run(command, env, timeout=400)
    assert returncode == 0, stderr[-4000:]
    return output, json.loads((output / "results.json").read_text())


@pytest.mark.slow
def test_sharded_steps_equal_one_process(fsdp_results):
    _, results = fsdp_results
    assert len(results["steps"]) == 2
    for step in results["steps"]:
        for process in step:  # both processes see the same global numbers
            # the token / target counts of the step are summed over the processes
            assert process["counts"] == process["ref_counts"]
            # the step loss (mean over processes of the rescaled per-process losses) equals the accumulated one
            assert process["loss"] == pytest.approx(process["ref_loss"], rel=1e-6)
            # gathered gradients and the weights after the step equal the unsharded ones; measured: exactly
            # (the ×world / ÷world of the rescaling and the reduce-scatter are exact in floating point)
            grad_abs, grad_rel = process["grad_diff"]
            param_abs, param_rel = process["param_diff"]
            assert grad_abs <= 1e-6 and grad_rel <= 1e-5
            assert param_abs <= 1e-6 and param_rel <= 1e-6
            # every logged component equals the reference's
            for name, value in process["ref_logs"].items():
                assert process["logs"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    # the runs train: TMC acts in step 2 and the losses move
    assert results["steps"][1][0]["logs"]["tmc_loss"] > 0
    assert results["steps"][1][0]["loss"] != results["steps"][0][0]["loss"]


@pytest.mark.slow
def test_gamma_is_gathered_from_its_shard(fsdp_results):
    _, results = fsdp_results
    for step in results["steps"]:
        # γ (one element) lives on one process only: the other holds an empty shard
        assert sorted(process["gamma_local_numel"] for process in step) == [0, 1]
        assert all(process["gamma_elements_over_processes"] == 1 for process in step)
        for process in step:  # yet every process logs the full value, equal to the unsharded model's γ
            assert process["ref_gamma"] != 0.0
            assert process["logs"]["cma_gamma"] == pytest.approx(process["ref_gamma"], rel=1e-6)
    # FSDP1's empty local views: the value is summed over the processes, found on both
    assert results["fsdp1_view_values"] == [3.5, 3.5]


@pytest.mark.slow
def test_full_state_exports_strictly_and_gives_the_same_outputs(fsdp_results):
    output, results = fsdp_results
    export = results["export"]
    no_problem = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert export["loading_info"] == no_problem
    assert export["params_vs_reference"] == [0.0, 0.0]  # the exported weights are the trained ones
    assert export["logits_diff"] <= 1e-6 and export["masks_diff"] <= 1e-6 and export["loss_diff"] <= 1e-6
    assert (output / "model" / "config.json").is_file() and (output / "model" / "processor_config.json").is_file()


@pytest.mark.slow
def test_resume_from_sharded_checkpoint_continues_exactly(fsdp_results):
    _, results = fsdp_results
    for process in results["steps"][1]:
        # a model with other initial weights, restored from the sharded checkpoint (model + SGD momentum), runs the
        # next step exactly like the uninterrupted run
        assert process["resumed_loss"] == process["loss"]
        assert process["resumed_grad_diff"] == [0.0, 0.0]
        assert process["resumed_param_diff"] == [0.0, 0.0]


@pytest.mark.slow
def test_lora_under_fsdp_exports_the_merged_model(fsdp_results):
    _, results = fsdp_results
    lora = results["lora"]
    # one step of a LoRA model sharded in two processes equals the unsharded one (adapters, trained copies, tokens)
    assert lora["grad_diff"] == [0.0, 0.0]
    assert lora["lora_B_trained"] > 0  # the adapters moved, so the merge changes the weights
    # the gathered PeftModel state loads strictly into the meta copy; merged and saved, it equals merge_lora of the
    # unsharded model
    assert lora["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                    "error_msgs": []}
    assert lora["lora_names"] == []
    assert lora["logits_diff"] <= 1e-6 and lora["masks_diff"] <= 1e-6
