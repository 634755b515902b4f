"""train.py --fsdp: the model, LoRA and AdamW sharded over the ranks (FSDP2) train the adapter one process
trains, and its whole-tensor checkpoints resume on any number of ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_model_dir, write_pairs
from test_train import assert_same_adapter, checkpoint_step, run_train, torchrun

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("fsdp")
    return tiny_model_dir(directory / "model", tokenizer_file), write_pairs(directory / "pairs.jsonl", n=8)


def test_two_sharded_processes_give_the_adapter_of_one(world, tmp_path):
    model_dir, data = world
    flags = ["--model", model_dir, "--data", data, "--eval_data", data, "--batch_size", 4, "--max_steps", 3, "--dtype", "fp32",
             "--lr", 0.01]  # the default LoRA dropout, 0.05
    run_train(*flags, "--micro_batch_size", 1, "--out", tmp_path / "one")
    # two micro-steps per rank (one gradient reduction per step), each block recomputed in the backward pass
    result = torchrun(*flags, "--micro_batch_size", 1, "--grad_checkpointing", "--fsdp", "--out", tmp_path / "sharded")
    assert_same_adapter(tmp_path / "sharded", tmp_path / "one")
    assert "eval_loss" in result.stdout  # eval ran, every rank through the same number of micro-batches


def descendants(pid: int) -> list[int]:
    """The processes started by pid, and by them, from /proc (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_sharded_run_killed_midway_resumes_on_one_process_to_the_uninterrupted_adapter(world, tmp_path):
    model_dir, data = world
    flags = ["--model", model_dir, "--data", data, "--batch_size", 4, "--micro_batch_size", 1, "--max_steps", 8,
             "--save_every", 1, "--dtype", "fp32", "--lr", 0.01]
    run_train(*flags, "--out", tmp_path / "whole")
    out = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(ROOT / "train.py"), *map(str, flags), "--fsdp", "--out", str(out)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while launcher.poll() is None and time.time() < deadline and checkpoint_step(out / "checkpoint" / "state.pt") < 3:
        time.sleep(0.005)
    for pid in [launcher.pid, *descendants(launcher.pid)]:  # the launcher and both ranks, at once
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    assert 3 <= checkpoint_step(out / "checkpoint" / "state.pt") < 8
    run_train(*flags, "--out", out, "--resume")  # one process, not sharded, continues the two ranks' checkpoint
    assert_same_adapter(out, tmp_path / "whole")
