"""--nproc_per_node N: a plain command starts the N processes of its run on this node itself, as
`torchrun --standalone --nproc_per_node N` would, once its flags and paths are checked, so a refusal is
one line before any process starts."""

import os
import signal
import socket
import subprocess
import sys
import time

from qadapter_min.common import LAUNCHED


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
