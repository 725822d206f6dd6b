"""`maskcma evaluate` in two processes (gloo, CPU) equals one process exactly, on images and videos, launched with
`torchrun` and with `accelerate launch`; a run whose process is killed mid-run resumes with only the missing
records, and the fingerprint still guards the folder.

The model is the answering tiny model of tests/test_pipeline.py (it answers "Sure, [SEG]." and segments the red
circle), so the predictions hold masks and the metrics are not trivially zero; every process runs one thread, as
does the one-process reference, so the float computations are the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_eval_data import IMAGE_SPLIT, VIDEO_SPLIT, write_image_split, write_video_split
from test_ddp import _free_port, _run
from test_pipeline import build_answering_folder

from transformers_maskcma.evaluation.predictions import PredictionStore, shard_filename

NUM_IMAGES = 8
NUM_VIDEOS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    folder, _ = build_answering_folder(root)
    write_image_split(root / "data", NUM_IMAGES)
    write_video_split(root / "data", NUM_VIDEOS)
    return root, folder


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _evaluate_args(bench, split: str, predictions: Path, *extra) -> list[str]:
    root, folder = bench
    return [
        "evaluate", "--model", str(folder), "--dataset", "custom", "--data-root", str(root / "data"),
        "--split", split, "--predictions", str(predictions), "--no-progress", "--threads", "1", *extra,
    ]  # fmt: skip


def _command(launcher: str, args: list[str], port: int | None = None) -> list[str]:
    port = port or _free_port()
    if launcher == "one":
        return [sys.executable, "-m", "transformers_maskcma.cli", *args]
    if launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "transformers_maskcma.cli", *args,
        ]  # fmt: skip
    # accelerate's torchrun launcher (--multi_gpu) also runs CPU processes; its --cpu with several processes
    # would need MPI
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "transformers_maskcma.cli", *args,
    ]  # fmt: skip


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(bench):
    """The one-process reference run of each split."""
    root, _ = bench
    folders = {}
    for split in (IMAGE_SPLIT, VIDEO_SPLIT):
        folders[split] = root / f"one-{split}"
        returncode, stderr = _run(_command("one", _evaluate_args(bench, split, folders[split])), _env(), timeout=600)
        assert returncode == 0, stderr[-4000:]
    return folders


@pytest.mark.parametrize(
    ("split", "launcher"), [(IMAGE_SPLIT, "torchrun"), (VIDEO_SPLIT, "torchrun"), (IMAGE_SPLIT, "accelerate")]
)
def test_two_processes_equal_one_process(bench, one_process, split, launcher, tmp_path):
    reference = one_process[split]
    two = tmp_path / "two"
    returncode, stderr = _run(_command(launcher, _evaluate_args(bench, split, two)), _env(), timeout=600)
    assert returncode == 0, stderr[-4000:]
    expected, got = _metrics(reference), _metrics(two)
    # the metrics and counts are exactly the one-process run's, and they are not trivially zero
    assert got["metrics"] == expected["metrics"]
    assert got["counts"] == expected["counts"] == {
        "samples": NUM_IMAGES if split == IMAGE_SPLIT else NUM_VIDEOS, "scored": got["counts"]["samples"],
        "excluded": 0, "missing": 0,
    }
    key = "gIoU" if split == IMAGE_SPLIT else "J&F"
    assert got["metrics"][key] > 0
    assert got["fingerprint"] == expected["fingerprint"]
    assert got["run"] == {
        "already_predicted": 0, "predicted_now": got["counts"]["samples"], "processes": 2, "batch_size": 1
    }
    assert expected["run"]["processes"] == 1
    # the same set of predictions, merged in the dataset's order: the files are byte for byte the same
    assert (two / "predictions.jsonl").read_bytes() == (reference / "predictions.jsonl").read_bytes()
    assert (two / "scores.jsonl").read_bytes() == (reference / "scores.jsonl").read_bytes()
    # the shards were merged and removed; the manifest names them, so --overwrite would remove a leftover one
    assert sorted(path.name for path in two.iterdir()) == [
        "maskcma_run.json", "metrics.json", "predictions.jsonl", "scores.jsonl"
    ]
    manifest = json.loads((two / "maskcma_run.json").read_text())
    assert {shard_filename(0, 2), shard_filename(1, 2)} <= set(manifest["files"])


def _worker_pid(port: int, rank: int) -> int | None:
    """The pid of the worker process of `rank` in the torchrun job on `port` (from the processes' environments)."""
    wanted = {f"MASTER_PORT={port}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= variables:
            return int(entry.name)
    return None


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_killed_process_resumes_only_the_missing_records(bench, one_process, tmp_path):
    reference = one_process[IMAGE_SPLIT]
    run = tmp_path / "run"
    port = _free_port()
    launcher = subprocess.Popen(
        _command("torchrun", _evaluate_args(bench, IMAGE_SPLIT, run), port),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    shard_one = run / shard_filename(1, 2)
    try:
        # wait until process 1 stored its first prediction, then freeze it and kill it: a process lost mid-run
        for _ in range(6000):
            if _complete_lines(shard_one) >= 1 or launcher.poll() is not None:
                break
            time.sleep(0.05)
        pid = _worker_pid(port, 1)
        assert pid is not None and launcher.poll() is None, "the run ended before process 1 could be killed"
        os.kill(pid, signal.SIGSTOP)
        done_by_one = _complete_lines(shard_one)
        os.kill(pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=300)  # torchrun stops the other process and fails
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode != 0
    assert 1 <= done_by_one < NUM_IMAGES // 2  # process 1 was killed before the end of its share
    assert not (run / "metrics.json").exists()
    shard_zero = run / shard_filename(0, 2)
    done = _complete_lines(shard_zero) + _complete_lines(shard_one)
    assert done < NUM_IMAGES

    # the fingerprint still guards the folder: another setting is refused, and the shards are left as they were
    shards_before = {path.name: path.read_bytes() for path in run.glob("predictions.shard-*")}
    refused, stderr = _run(
        _command("torchrun", _evaluate_args(bench, IMAGE_SPLIT, run, "--max-new-tokens", "16")), _env(), timeout=600
    )
    assert refused != 0
    assert "holds another run" in stderr and "generation.max_new_tokens: 32 vs 16" in stderr
    assert {path.name: path.read_bytes() for path in run.glob("predictions.shard-*")} == shards_before

    # the same run relaunched predicts only what is missing; the result is the uninterrupted one-process run's
    returncode, stderr = _run(_command("torchrun", _evaluate_args(bench, IMAGE_SPLIT, run)), _env(), timeout=600)
    assert returncode == 0, stderr[-4000:]
    metrics = _metrics(run)
    assert metrics["run"]["already_predicted"] == done
    assert metrics["run"]["predicted_now"] == NUM_IMAGES - done
    assert metrics["metrics"] == _metrics(reference)["metrics"]
    # the same set of predictions (the lines merged from the killed run come first, so the order may differ)
    assert sorted((run / "predictions.jsonl").read_bytes().splitlines()) == sorted(
        (reference / "predictions.jsonl").read_bytes().splitlines()
    )
    assert (run / "scores.jsonl").read_bytes() == (reference / "scores.jsonl").read_bytes()
    assert not list(run.glob("predictions.shard-*"))
    assert len(PredictionStore(run)) == NUM_IMAGES

    # one process resumes a finished two-process folder: nothing is predicted again
    returncode, stderr = _run(_command("one", _evaluate_args(bench, IMAGE_SPLIT, run)), _env(), timeout=600)
    assert returncode == 0, stderr[-4000:]
    assert _metrics(run)["run"] == {
        "already_predicted": NUM_IMAGES, "predicted_now": 0, "processes": 1, "batch_size": 1
    }


def test_batched_two_process_run_matches_within_the_tolerance(bench, one_process, tmp_path):
    """Batches of 3 images in each of two processes: the same samples, masks within IoU 0.999 of batch size 1."""
    import numpy as np

    reference = one_process[IMAGE_SPLIT]
    run = tmp_path / "batched"
    returncode, stderr = _run(
        _command("torchrun", _evaluate_args(bench, IMAGE_SPLIT, run, "--batch-size", "3")), _env(), timeout=600
    )
    assert returncode == 0, stderr[-4000:]
    assert _metrics(run)["run"]["batch_size"] == 3
    batched, single = PredictionStore(run), PredictionStore(reference)
    assert batched.sample_ids() == single.sample_ids()
    for sample_id in single.sample_ids():
        first, second = batched.masks(sample_id), single.masks(sample_id)
        union = np.count_nonzero(first | second)
        assert union == 0 or np.count_nonzero(first & second) / union >= 0.999
    assert _metrics(run)["metrics"] == pytest.approx(_metrics(reference)["metrics"], abs=1e-3)


PROCESS_GROUP_WORKER = '''
import json, sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from transformers_maskcma.data.custom import load_custom
from transformers_maskcma.evaluation.runner import evaluate_dataset

split, output, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")  # a process group made by the caller (as a training script's): evaluation joins it
rank = dist.get_rank()


def predict(record):
    if mode == "fail" and rank == 1:
        raise RuntimeError("process one broke")
    return np.asarray(record["frames"][0])[..., 0] > 200  # the red pixels


report = {}
try:
    result = evaluate_dataset(load_custom(split), predict, output, show_progress=False)
    report.update(metrics=result["metrics"], run=result["run"])
except Exception as error:
    report["error"] = f"{type(error).__name__}: {error}"
report["group_kept"] = dist.is_initialized()
(output.parent / f"report-{mode}-{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
'''


def test_an_existing_process_group_is_joined_and_a_failure_stops_every_process(bench, tmp_path):
    """evaluate_dataset inside a script that made its own process group, with a stand-in predict function (no
    model): the same metrics in both processes as in one; when process 1 fails, both stop with its message."""
    import numpy as np

    from transformers_maskcma.data.custom import load_custom
    from transformers_maskcma.evaluation.distributed import EvaluationProcesses
    from transformers_maskcma.evaluation.runner import evaluate_dataset

    root, _ = bench
    split = root / "data" / f"{IMAGE_SPLIT}.jsonl"
    script = tmp_path / "worker.py"
    script.write_text(PROCESS_GROUP_WORKER)

    def launch(mode: str) -> None:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(split),
            str(tmp_path / mode), mode,
        ]  # fmt: skip
        _run(command, _env(), timeout=600)

    one = evaluate_dataset(
        load_custom(split), lambda record: np.asarray(record["frames"][0])[..., 0] > 200, tmp_path / "one",
        show_progress=False, processes=EvaluationProcesses(),
    )
    launch("ok")
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report-ok-{rank}.json").read_text())
        assert "error" not in report, report
        assert report["metrics"] == one["metrics"] and report["metrics"]["gIoU"] > 0  # every process returns them
        assert report["run"]["processes"] == 2
        assert report["group_kept"]  # the caller's group is left to the caller
    assert (tmp_path / "ok" / "predictions.jsonl").read_bytes() == (tmp_path / "one" / "predictions.jsonl").read_bytes()

    launch("fail")
    failed = json.loads((tmp_path / "report-fail-1.json").read_text())["error"]
    other = json.loads((tmp_path / "report-fail-0.json").read_text())["error"]
    assert failed.startswith("RuntimeError: predicting sample") and "process one broke" in failed
    assert other.startswith("EvaluationProcessError: process 1 of 2 failed while predicting (RuntimeError: predicting")
    # nothing was scored; process 0's share is kept in its shard for the next run
    assert not (tmp_path / "fail" / "metrics.json").exists()
    assert len(PredictionStore(tmp_path / "fail", filename=shard_filename(0, 2))) == NUM_IMAGES // 2
