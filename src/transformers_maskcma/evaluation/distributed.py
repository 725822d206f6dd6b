"""Evaluation in several processes: who this process is, and how the processes agree.

``accelerate launch`` and ``torchrun`` start one process per device and set ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``). :meth:`EvaluationProcesses.from_environment` reads them;
with ``WORLD_SIZE`` > 1 it joins the processes through a gloo process group (gloo runs on CPU, so the same code
coordinates CPU-only and GPU runs; the predictions themselves never travel between processes, only small status
objects do). An existing process group (e.g. one accelerate's ``PartialState`` made with NCCL) is reused through a
gloo group of the same processes.

Every collective step goes through :meth:`EvaluationProcesses.agree`: each process reports its error (or none) and
all processes raise when one failed, so a failure in one process (a refused output folder, a bad split, a model
error) stops every process with the same message instead of leaving the others waiting at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["EvaluationProcessError", "EvaluationProcesses"]

T = TypeVar("T")


class EvaluationProcessError(RuntimeError):
    """Another process of a multi-process evaluation failed; the message names it and its error."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(
                f"WORLD_SIZE is set but {name} is not; launch the processes with torchrun or accelerate launch, which "
                "set RANK, WORLD_SIZE and LOCAL_RANK together"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class EvaluationProcesses:
    """The processes of one evaluation run and this process's place among them.

    Args:
        rank: this process's index, ``0 <= rank < world_size``; process 0 is the main one (it claims the output
            folder, merges the shards and scores).
        world_size: number of processes.
        local_rank: index on this machine (selects the GPU ``cuda:<local_rank>``).
        group: the gloo process group (``None`` for one process).
        owns_group: the default process group was created here, and :meth:`close` destroys it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    owns_group: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size} is not valid")
        if self.world_size > 1 and self.group is None:
            raise ValueError("several processes need a process group (use EvaluationProcesses.from_environment())")

    @classmethod
    def from_environment(cls) -> EvaluationProcesses:
        """One process unless ``WORLD_SIZE`` > 1; then ``RANK`` / ``LOCAL_RANK`` from the launcher's environment and
        a gloo group over the processes (the default process group is initialised from ``MASTER_ADDR`` /
        ``MASTER_PORT`` when nothing initialised it yet)."""
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size <= 1:
            return cls()
        rank = _env_int("RANK")
        local_rank = _env_int("LOCAL_RANK", rank)
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; evaluate in one process")
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            group = dist.group.WORLD
        elif dist.get_backend() == "gloo":
            group = dist.group.WORLD
        else:
            group = dist.new_group(backend="gloo")
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment says "
                f"{rank} of {world_size}"
            )
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, group=group, owns_group=owns_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def default_device(self) -> str:
        """``cuda:<local_rank>`` when CUDA is available (``cuda`` for one process), else ``cpu``."""
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local_rank}" if self.distributed else "cuda"

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's part of ``items``: every ``world_size``-th item from ``rank`` on (interleaved, so long and
        short samples of a sorted split spread over the processes)."""
        return list(items[self.rank :: self.world_size])

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order (picklable objects; every process must call it)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def agree(self, step: str, error: BaseException | None, value: Any = None) -> list[Any]:
        """Every process reports how ``step`` went; returns every process's ``value`` when all succeeded.

        A process that failed re-raises its own ``error``; the others raise `EvaluationProcessError` naming the
        failed process and its message. Every process must call it.
        """
        message = None if error is None else f"{type(error).__name__}: {error}"
        reports = self.gather((message, value))
        if error is not None:
            raise error
        failed = [(rank, report[0]) for rank, report in enumerate(reports) if report[0] is not None]
        if failed:
            rank, message = failed[0]
            raise EvaluationProcessError(
                f"process {rank} of {self.world_size} failed while {step} ({message}); every process stops"
            )
        return [report[1] for report in reports]

    def run_on_main(self, step: str, function: Callable[[], T], share: bool = False) -> T | None:
        """Run ``function`` in the main process while the others wait (the call is a barrier).

        Returns:
            ``function()``'s result in the main process; in the others ``None``, or with ``share=True`` the same
            result (it must then be picklable).
        """
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except Exception as caught:  # reported to every process by agree(), then re-raised here
                error = caught
        values = self.agree(step, error, result if share and self.distributed else None)
        if self.is_main:
            return result
        return values[0] if share else None

    def close(self) -> None:
        """Destroy the default process group if :meth:`from_environment` made it (nothing for one process)."""
        if not self.owns_group:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
