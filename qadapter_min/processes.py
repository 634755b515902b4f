"""The processes of a run: one plain `python script.py`, several on one node with --nproc_per_node N
(started by launch.py), or several on one node or more under torchrun.

Each process is told RANK, LOCAL_RANK and WORLD_SIZE, and where rank 0 listens (MASTER_ADDR,
MASTER_PORT); the process group then runs over NCCL between GPUs, or gloo on CPUs. Rank 0, the master,
prints and writes; every rank computes.
"""

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qadapter_min import UserError
from qadapter_min.common import POSITIVE_INT, default_device
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


def start_processes(nproc_per_node: int = 1) -> Processes:
    """This process's place in the run. A plain command with --nproc_per_node N > 1 (its flags and paths
    already checked) starts the N processes of the run instead, and ends with them: it does not return."""
    if "RANK" not in os.environ:
        if nproc_per_node > 1:
            from qadapter_min.launch import launch  # the launcher, needed only here

            sys.exit(launch(nproc_per_node))
        return Processes(0, 0, 1, default_device())
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # started by torchrun on this node
    if nproc_per_node > 1 and nproc_per_node != here:
        raise UserError(
            f"--nproc_per_node {nproc_per_node} asks for processes that torchrun starts ({here} per "
            f"node here); drop --nproc_per_node under torchrun"
        )
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    processes = Processes(dist.get_rank(), local_rank, dist.get_world_size(), default_device(local_rank))
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


def add_nproc_flag(parser):
    parser.add_argument(
        "--nproc_per_node",
        type=POSITIVE_INT,
        default=1,
        help="start this many processes on this node, one per GPU, as torchrun --nproc_per_node does; "
        "a refusal then ends them all in one line (torchrun adds its own report of the failure)",
    )
