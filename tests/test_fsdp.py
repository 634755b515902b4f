"""train.py --fsdp: the model, LoRA and AdamW sharded over the ranks (FSDP2) train the adapter one process
trains, and its whole-tensor checkpoints resume on any number of ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import assert_same_adapter, checkpoint_step, run_train, torchrun

from conftest import random_hf_state, tiny_args, tiny_model_dir, write_checkpoint, write_pairs
from qadapter_min.lora import add_lora
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("fsdp")
    return tiny_model_dir(directory / "model", tokenizer_file), write_pairs(directory / "pairs.jsonl", n=8)


def test_two_sharded_processes_give_the_adapter_of_one(world, tmp_path):
    model_dir, data = world
    flags = [
        "--model",
        model_dir,
        "--data",
        data,
        "--eval_data",
        data,
        "--batch_size",
        4,
        "--max_steps",
        3,
        "--dtype",
        "fp32",
        "--lr",
        0.01,
    ]  # the default LoRA dropout, 0.05
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


@pytest.mark.slow  # out of CI's six minutes: python -m pytest -m slow
def test_a_sharded_run_killed_midway_resumes_sharded_or_on_one_process_to_the_uninterrupted_adapter(world, tmp_path):
    model_dir, data = world
    flags = ["--model", model_dir, "--data", data]
    flags += "--batch_size 4 --micro_batch_size 1 --max_steps 8 --save_every 1 --dtype fp32 --lr 0.01".split()
    run_train(*flags, "--out", tmp_path / "whole")
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            *map(str, flags),
            "--fsdp",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while launcher.poll() is None and time.time() < deadline and checkpoint_step(out / "checkpoint" / "state.pt") < 3:
        time.sleep(0.005)
    for pid in [launcher.pid, *descendants(launcher.pid)]:  # the launcher and both ranks, at once
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    assert 3 <= checkpoint_step(out / "checkpoint" / "state.pt") < 8
    shutil.copytree(out, tmp_path / "copy")
    torchrun(*flags, "--out", out, "--resume", "--fsdp")  # the two ranks continue their own checkpoint
    assert_same_adapter(out, tmp_path / "whole")
    run_train(*flags, "--out", tmp_path / "copy", "--resume")  # one process, not sharded, continues it too
    assert_same_adapter(tmp_path / "copy", tmp_path / "whole")


# Run by each of two ranks: load a checkpoint sharded, noting at every tensor read whether the storage of any
# tensor read before is still alive anywhere in the process (a view of it counts), then report what each rank
# holds and write the gathered weights.
LOAD_SHARDED = """
import json, sys, weakref
from pathlib import Path
import torch, torch.distributed as dist
from qadapter_min import sharding
from qadapter_min.common import full

model_dir, out = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
read, alive_at_each_read = [], []
checkpoint_tensors = sharding.checkpoint_tensors

def counted(*args):
    for name, tensor in checkpoint_tensors(*args):
        alive_at_each_read.append(sum(storage() is not None for storage in read))
        read.append(weakref.ref(tensor.untyped_storage()))
        yield name, tensor
        del tensor

sharding.checkpoint_tensors = counted
torch.manual_seed(0)
model = sharding.load_sharded_model(model_dir, torch.float32, torch.device("cpu"), r=4, alpha=8, dropout=0.0,
                                    targets=("q_proj", "v_proj"))
alive_after = sum(storage() is not None for storage in read)
local = {name: p.to_local().shape[0] for name, p in model.named_parameters()}
whole = {name: full(p).detach() for name, p in model.named_parameters()}
rank = dist.get_rank()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"reads": len(read), "alive_at_each_read": alive_at_each_read, "alive_after": alive_after,
               "rows": local}, f)
if rank == 0:
    torch.save(whole, f"{out}/whole.pt")
dist.destroy_process_group()
"""


def test_sharded_loading_reads_one_tensor_at_a_time_and_keeps_only_each_ranks_rows(tmp_path):
    args = tiny_args()  # a vocabulary of 101 rows: the two ranks keep 51 and 50
    state = random_hf_state(args, seed=3)
    model_dir = write_checkpoint(tmp_path / "model", args, state, shards=3)
    script = tmp_path / "load_sharded.py"
    script.write_text(LOAD_SHARDED)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(model_dir),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    reference = load_model(model_dir)  # whole, with the LoRA init a sharded run must reproduce
    torch.manual_seed(0)
    add_lora(reference, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    whole = torch.load(tmp_path / "whole.pt")
    assert whole.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(whole[name], tensor), name

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["reads"] == len(state)  # each checkpoint tensor read once
        assert set(report["alive_at_each_read"]) == {0} and report["alive_after"] == 0
    for name, tensor in reference.state_dict().items():
        rows = tensor.shape[0]
        assert [report["rows"][name] for report in ranks] == [(rows + 1) // 2, rows // 2], name
