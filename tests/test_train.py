"""train.py end to end on a tiny checkpoint: the logged loss, DDP equivalence, resuming after SIGKILL."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_objective import slow_qadapter_loss

import train
from conftest import tiny_model_dir, write_pairs
from qadapter_min import run_dir
from qadapter_min.data import collate, encode_pairs, load_pairs
from qadapter_min.lora import dropout_keys
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("train")
    return tiny_model_dir(directory / "model", tokenizer_file), write_pairs(directory / "pairs.jsonl", n=8)


def run_train(*flags, check=True, **popen):
    command = [sys.executable, str(ROOT / "train.py"), *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, check=check, cwd=ROOT, **popen)


def strings(flags):
    return [str(flag) for flag in flags]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_first_logged_loss_is_the_objective_of_the_steps_pairs_at_lora_initialisation(world, tmp_path):
    model_dir, data = world
    train.main(
        strings(
            [
                "--model",
                model_dir,
                "--data",
                data,
                "--out",
                tmp_path,
                "--batch_size",
                8,
                "--micro_batch_size",
                1,
                "--max_steps",
                1,
                "--dtype",
                "fp32",
                "--lora_dropout",
                0,
                "--alpha0",
                0.3,
                "--beta",
                0.2,
            ]
        )
    )
    logged = metrics(tmp_path)[0]["loss"]
    # the same 8 pairs, the model without any adapter (B = 0 makes Q the base logits), the slow loop
    tokenizer = Tokenizer(model_dir)
    encoded = encode_pairs(load_pairs(data, log=lambda *_: None), tokenizer, 512, log=lambda *_: None)
    tokens, response_mask = collate(encoded, pad_id=0)
    with torch.no_grad():
        logits = load_model(model_dir)(tokens)
    expected = slow_qadapter_loss(logits, logits, tokens, response_mask, alpha=1.0, alpha0=0.3, beta=0.2, gamma=1.0)
    assert logged == pytest.approx(expected.item(), rel=1e-5)


def test_outputs_and_the_metrics_schema(world, tmp_path):
    model_dir, data = world
    train.main(
        strings(
            [
                "--model",
                model_dir,
                "--data",
                data,
                "--eval_data",
                data,
                "--out",
                tmp_path,
                "--batch_size",
                4,
                "--micro_batch_size",
                2,
                "--max_steps",
                3,
                "--eval_every",
                2,
                "--log_every",
                2,
            ]
        )
    )
    assert {p.name for p in tmp_path.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "qadapter_config.json",
        "metrics.jsonl",
    }
    rows = metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3] and [r["step"] for r in eval_rows] == [2, 3]
    for row in train_rows:
        assert set(row) == {
            "step",
            "loss",
            "pref_loss",
            "chi2_loss",
            "preference_accuracy",
            "preference_margin",
            "implicit_reward_accuracy",
            "implicit_reward_margin",
            "lr",
            "grad_norm",
            "tokens_per_s",
        }
        assert row["loss"] == pytest.approx(row["pref_loss"] + row["chi2_loss"], rel=1e-5)
    for row in eval_rows:
        assert set(row) == {"step", "eval_loss"} | {
            f"eval_{kind}_{what}" for kind in ("preference", "implicit_reward") for what in ("accuracy", "margin")
        }
    assert [r["lr"] for r in train_rows] == pytest.approx([3e-4, 2e-4, 1e-4])  # linear decay to 0 after step 3
    config = json.loads((tmp_path / "qadapter_config.json").read_text())
    assert config["objective"] == "qadapter" and config["alpha0"] == 0.01 and config["base_model"] == str(model_dir)
    assert len(config["base_model_fingerprint"]) == 16 and config["args"]["batch_size"] == 4


def assert_same_adapter(out: Path, reference: Path, atol=1e-5):
    got, want = (load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol)
    assert any(want[name].abs().max() > 1e-4 for name in want if "lora_B" in name)  # training moved B off zero


def torchrun(*flags, processes=2):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            str(ROOT / "train.py"),
            *map(str, flags),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_give_the_adapter_of_one_and_continue_its_checkpoint(world, tmp_path, monkeypatch):
    """At the default LoRA dropout (0.05): each pair's masks do not depend on the process it lands on."""
    model_dir, data = world
    flags = ["--model", model_dir, "--data", data]
    flags += "--batch_size 4 --micro_batch_size 1 --max_steps 4 --save_every 2 --dtype fp32".split()
    run_train(*flags, "--out", tmp_path / "one")
    torchrun(*flags, "--out", tmp_path / "two")
    assert_same_adapter(tmp_path / "two", tmp_path / "one")

    # one process stops after its step-2 checkpoint; two processes resume it
    monkeypatch.setattr(run_dir, "save_adapter", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("power cut")))
    with pytest.raises(RuntimeError):
        train.main(strings(flags + ["--out", tmp_path / "mixed"]))
    resumed = ["--resume", "--nproc_per_node", 2]  # two processes that train.py starts itself
    run_train(*flags, "--out", tmp_path / "mixed", *resumed)
    assert_same_adapter(tmp_path / "mixed", tmp_path / "one")


@pytest.mark.parametrize("split", [["--micro_batch_size", 4], ["--micro_batch_size", 2, "--grad_checkpointing"]])
def test_micro_batches_and_recomputed_blocks_give_the_adapter_of_one_pair_at_a_time(world, tmp_path, split):
    model_dir, data = world
    flags = ["--model", model_dir, "--data", data, "--batch_size", 4, "--max_steps", 3, "--dtype", "fp32"]
    train.main(strings(flags + ["--micro_batch_size", 1, "--out", tmp_path / "one"]))
    train.main(strings(flags + split + ["--out", tmp_path / "split"]))
    assert_same_adapter(tmp_path / "split", tmp_path / "one")


def checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):  # not written yet
        return 0


def test_a_run_killed_three_times_at_random_moments_resumes_to_the_adapter_of_an_uninterrupted_run(world, tmp_path):
    model_dir, data = world
    flags = [
        "--model",
        model_dir,
        "--data",
        data,
        "--batch_size",
        4,
        "--micro_batch_size",
        1,
        "--max_steps",
        16,  # three kills, each 1-5 steps after the last checkpoint: all can land mid-run
        "--save_every",
        1,
        "--log_every",
        10,
    ]
    run_train(*flags, "--out", tmp_path / "whole")

    out = tmp_path / "killed"
    checkpoint = out / "checkpoint" / "state.pt"
    moments = random.Random(0)
    killed_at = []
    for _ in range(3):
        resume = ["--resume"] if checkpoint.exists() else []
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *map(str, flags), "--out", str(out), *resume],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        target = checkpoint_step(checkpoint) + moments.randint(
            1, 5
        )  # wait until this run has checkpointed that step ...
        deadline = time.time() + 60
        while process.poll() is None and time.time() < deadline and checkpoint_step(checkpoint) < target:
            time.sleep(0.005)
        time.sleep(moments.uniform(0.0, 0.03))  # ... then kill it at a random moment within a step
        process.send_signal(signal.SIGKILL)
        process.wait()
        if checkpoint.exists():
            killed_at.append(torch.load(checkpoint, weights_only=True)["step"])
    assert any(0 < step < 16 for step in killed_at), killed_at  # some kills landed mid-run

    run_train(*flags, "--out", out, *(["--resume"] if checkpoint.exists() else []))
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter_model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-7)
    assert [r["step"] for r in metrics(out)] == [r["step"] for r in metrics(tmp_path / "whole")]


def test_resume_refuses_a_checkpoint_made_with_other_flags(world, tmp_path, monkeypatch):
    model_dir, data = world
    flags = ["--model", model_dir, "--data", data, "--out", tmp_path]
    flags += "--batch_size 4 --max_steps 3 --save_every 1".split()

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went down while writing the adapter")

    monkeypatch.setattr(run_dir, "save_adapter", crash)  # a run that dies at its end keeps its last checkpoint
    with pytest.raises(RuntimeError):
        train.main(strings(flags))
    assert (tmp_path / "checkpoint" / "state.pt").exists()
    result = run_train(*flags, "--resume", "--lr", "1e-3", check=False)
    assert (
        result.returncode == 2 and "made with other flags (--lr)" in result.stderr and "Traceback" not in result.stderr
    )


def test_a_batch_size_that_does_not_divide_is_one_clear_error(world, tmp_path):
    model_dir, data = world
    result = run_train(
        "--model", model_dir, "--data", data, "--out", tmp_path, "--batch_size", 5, "--micro_batch_size", 2, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --batch_size 5 is not a multiple of --micro_batch_size (2) x 1 processes; "
        "choose a batch size divisible by 2"
    )


def test_the_step_plan_covers_each_epoch_once_in_a_seeded_order_and_splits_it_over_ranks():
    num_pairs, batch_size, seed = 10, 4, 7  # 2 steps per epoch; 2 pairs of each epoch left out
    plan = {
        (step, rank, world): train.step_plan(step, rank, world, num_pairs, batch_size, seed)
        for step in range(6)
        for world in (1, 2, 4)
        for rank in range(world)
    }
    for step in range(6):
        whole = plan[step, 0, 1]
        assert len(whole) == batch_size == len(set(whole))
        for world in (2, 4):  # the ranks' shares, in rank order, are the one-process step
            assert sum((plan[step, rank, world] for rank in range(world)), []) == whole
    for epoch in range(3):
        pairs = plan[2 * epoch, 0, 1] + plan[2 * epoch + 1, 0, 1]
        assert len(set(pairs)) == 8 and set(pairs) <= set(range(num_pairs))  # no pair twice within an epoch
    assert plan[0, 0, 1] + plan[1, 0, 1] != plan[2, 0, 1] + plan[3, 0, 1]  # each epoch in its own order
    assert train.step_plan(3, 1, 2, num_pairs, batch_size, seed) == plan[3, 1, 2]  # a pure function
    assert train.step_plan(0, 0, 1, num_pairs, batch_size, seed + 1) != plan[0, 0, 1]  # the seed sets the order


def test_a_pairs_dropout_keys_depend_on_seed_step_pair_and_side_only():
    keys = dropout_keys(7, 3, [5, 2, 9])  # (6,): chosen rows of pairs 5, 2, 9, then their rejected rows
    assert keys.shape == (6,) and len(set(keys.tolist())) == 6
    alone = [dropout_keys(7, 3, [i]).tolist() for i in (5, 2, 9)]  # each pair in a micro-batch of its own
    assert keys.tolist() == [k[0] for k in alone] + [k[1] for k in alone]
    assert dropout_keys(7, 4, [5])[0] != keys[0] and dropout_keys(8, 3, [5])[0] != keys[0]


def test_an_adapter_finds_its_base_model_from_any_directory_or_says_to_pass_model(world, tmp_path, monkeypatch):
    """Trained with --model given as a relative path, the adapter records where the base model is, so
    sample.py --adapter finds it from elsewhere; a base model moved since is refused, saying --model."""
    import sample
    from conftest import run_script

    model_dir, data = world
    base = tmp_path / "here" / "base"
    shutil.copytree(model_dir, base)
    monkeypatch.chdir(base.parent)
    flags = ["--model", "base", "--data", data, "--batch_size", 4, "--max_steps", 1]
    train.main(strings(flags + ["--out", tmp_path / "out"]))
    monkeypatch.chdir(tmp_path)  # where no "base" is
    reply = ["--adapter", tmp_path / "out", "--prompt", "hi", "--max_new_tokens", 2]
    result = run_script(sample.main, *reply)
    assert result.returncode == 0, result.stderr
    base.rename(tmp_path / "moved")
    result = run_script(sample.main, *reply)
    assert result.returncode == 2 and "pass its base model with --model" in result.stderr
