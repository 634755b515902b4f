"""The processes of a run: one plain `python script.py`, or several under torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts; the process group then runs
over NCCL between GPUs, or gloo on CPUs. Rank 0, the master, prints and writes; every rank computes.
"""

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qadapter_min.common import default_device
from qadapter_min.weights import resolve_model_dir


@dataclass
class Processes:
    """This process's place in the run: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
    `python script.py` is rank 0 of 1."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, *text):
        if self.master:
            print(*text, flush=True)

    def resolve_model_dir(self, name: str) -> Path:
        """The model's local directory. Node by node: rank 0 downloads a Hub model, then the first rank of
        every other node (which finds it there if the nodes share the cache), then all the others."""
        if self.master:
            model_dir = resolve_model_dir(name)
        if self.distributed:
            dist.barrier()
            if self.local_rank == 0 and not self.master:
                model_dir = resolve_model_dir(name)
            dist.barrier()
        return model_dir if self.local_rank == 0 else resolve_model_dir(name)


def start_processes() -> Processes:
    if "RANK" not in os.environ:
        return Processes(0, 0, 1, default_device())
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    processes = Processes(
        dist.get_rank(), local_rank, dist.get_world_size(), default_device(local_rank)
    )
    if processes.device.type == "cuda":
        torch.cuda.set_device(processes.device)
    return processes


def leave_processes(processes: Processes):
    """Leave together and end the process group while the interpreter is whole. Everything that holds
    the group (the DDP wrapper, through its reducer) must be gone first: otherwise the gloo backend
    outlives destroy_process_group and is torn down in the interpreter's own exit, where its threads
    sometimes abort the process ("terminate called without an active exception") after all the work
    is done, and torchrun reports the run failed (1 of 48 two-process CPU runs here; 0 of 96 since)."""
    if processes.distributed:
        gc.collect()  # the DDP wrapper and its reducer refer to each other: free them now, not at exit
        dist.barrier()  # leave together, rank 0's files written
        dist.destroy_process_group()
