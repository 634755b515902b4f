"""The processes of a run: one plain `python script.py`, several on one node with --nproc_per_node N
(started by launch below), or several on one node or more under torchrun.

Each process is told RANK, LOCAL_RANK and WORLD_SIZE, and where rank 0 listens (MASTER_ADDR,
MASTER_PORT); the process group then runs over NCCL between GPUs, or gloo on CPUs. Rank 0, the master,
prints and writes; every rank computes.
"""

import gc
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qadapter_min import UserError
from qadapter_min.common import LAUNCHED, default_device
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
        type=int,
        default=1,
        help="start this many processes on this node, one per GPU, as torchrun --nproc_per_node does; "
        "a refusal then ends them all in one line (torchrun adds its own report of the failure)",
    )


def launch(n: int) -> int:
    """Run this same command as n processes on this node, as `torchrun --standalone --nproc_per_node n`
    would, and return the run's exit code. The first process to fail ends the others, and its code is the
    run's: a refusal (2) or Ctrl-C (130) has said all there is in rank 0's one line, so nothing is added;
    any other failure gets one line naming the rank. After a refusal or Ctrl-C the others get five
    seconds to end by themselves (each meets it too, and rank 0 says why), then are stopped. Ctrl-C
    reaches every process from the terminal."""
    with socket.socket() as probe:  # a free port for rank 0 to listen on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n))
    env.update(LOCAL_WORLD_SIZE=str(n), **{LAUNCHED: "1"})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # CPUs shared out
    command = [sys.executable, *sys.orig_argv[1:]]
    ranks = [subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in range(n)]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # after the start: the processes keep Ctrl-C
    while True:
        codes = [process.poll() for process in ranks]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            break
        time.sleep(0.1)
    if not failed:
        return 0
    rank, code = failed[0], codes[failed[0]]
    deadline = time.time() + (5 if code in (2, 130) else 0)  # a moment for rank 0 to say why
    for process in ranks:
        try:
            process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
    if code < 0:
        print(
            f"error: rank {rank} was killed by {signal.Signals(-code).name}; the others were stopped",
            file=sys.stderr,
            flush=True,
        )
        return 128 - code
    if code not in (2, 130):
        print(
            f"error: rank {rank} failed (exit code {code}), its output is above; the others were stopped",
            file=sys.stderr,
            flush=True,
        )
    return code
