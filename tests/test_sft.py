"""The SFT baseline in the same training loop: its loss by the definition, records of both kinds, and the
loop's guarantees (any number of processes, resumption after SIGKILL)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import assert_same_adapter, checkpoint_step, metrics, run_train, strings, torchrun

import train
from conftest import tiny_model_dir, write_pairs
from qadapter_min import UserError
from qadapter_min.data import load_conversations
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent


def write_messages(path: Path, n: int) -> Path:
    """n {"messages": [...]} records, replies of different lengths, some with a system message and two turns."""
    with open(path, "w") as f:
        for i in range(n):
            messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
            messages += [
                {"role": "user", "content": f"Count to {i}."},
                {"role": "assistant", "content": " ".join(map(str, range(i + 1)))},
            ]
            if i % 3 == 0:
                messages += [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("sft")
    return (
        tiny_model_dir(directory / "model", tokenizer_file),
        write_pairs(directory / "pairs.jsonl", n=6),
        write_messages(directory / "messages.jsonl", n=6),
    )


def slow_sft_loss(model_dir: Path, conversations: list[list[dict]]) -> float:
    """Record by record, token by token: the mean over records of the mean -log p of the reply's tokens
    (the closing <|eot_id|> included) under the model (the adapter at initialisation adds nothing)."""
    tokenizer, model = Tokenizer(model_dir), load_model(model_dir)
    per_record = []
    for conversation in conversations:
        prompt = tokenizer.encode_chat(conversation[:-1], add_generation_prompt=True)
        ids = tokenizer.encode_chat(conversation)
        with torch.no_grad():
            log_p = model(torch.tensor([ids]))[0].log_softmax(-1)
        nll = [-log_p[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]
        assert ids[-1] == tokenizer.eot_id and len(nll) == len(ids) - len(prompt)
        per_record.append(sum(nll) / len(nll))
    return sum(per_record) / len(per_record)


@pytest.mark.parametrize("micro_batch_size", [1, 3])
@pytest.mark.parametrize("kind", ["pairs", "messages"])
def test_the_first_logged_sft_loss_is_the_mean_over_records_of_each_replys_mean_token_loss(
    world, tmp_path, kind, micro_batch_size
):
    model_dir, pairs, messages = world
    data = pairs if kind == "pairs" else messages
    train.main(
        strings(
            [
                "--model",
                model_dir,
                "--data",
                data,
                "--objective",
                "sft",
                "--out",
                tmp_path,
                "--batch_size",
                6,
                "--micro_batch_size",
                micro_batch_size,
                "--max_steps",
                1,
                "--dtype",
                "fp32",
            ]
        )
    )
    row = metrics(tmp_path)[0]
    assert set(row) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    expected = slow_sft_loss(
        model_dir, load_conversations(data, log=lambda *_: None)
    )  # all six records: the whole step
    assert row["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_record_whose_last_message_is_not_the_assistants_is_refused_naming_its_line(world, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "a"}]})
        + "\n"
    )
    with pytest.raises(UserError, match=rf"^{path}: line 2: its last message is not the assistant's"):
        load_conversations(path, log=lambda *_: None)


@pytest.mark.slow  # out of CI's six minutes: python -m pytest -m slow
def test_two_processes_and_a_run_killed_and_resumed_give_the_sft_adapter_of_one_uninterrupted_process(world, tmp_path):
    model_dir, pairs, messages = world
    flags = [
        "--model",
        model_dir,
        "--data",
        pairs,
        messages,
        "--objective",
        "sft",
        "--batch_size",
        4,
        "--micro_batch_size",
        1,
        "--max_steps",
        8,
        "--save_every",
        1,
        "--lr",
        0.01,
        "--dtype",
        "fp32",
    ]  # the default LoRA dropout, 0.05
    run_train(*flags, "--out", tmp_path / "one")
    torchrun(*flags, "--out", tmp_path / "two")
    assert_same_adapter(tmp_path / "two", tmp_path / "one")

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, flags), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while process.poll() is None and time.time() < deadline and checkpoint_step(out / "checkpoint" / "state.pt") < 3:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= checkpoint_step(out / "checkpoint" / "state.pt") < 8
    run_train(*flags, "--out", out, "--resume")
    assert_same_adapter(out, tmp_path / "one", atol=1e-7)


def test_replay_data_is_sample_pys_output_read_back_as_each_prompt_and_its_reply(tmp_path):
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    lines = [
        {"prompt": "What is 2+2?", "reply": "4."},  # sample.py's output for a {"prompt"} record
        {"messages": prompt, "reply": "4.", "base_reply": "Four."},  # ... for a {"messages"} record, with --compare
        {
            "chosen": prompt + [{"role": "assistant", "content": "It is 4."}],  # ... for a preference record
            "rejected": prompt + [{"role": "assistant", "content": "5"}],
            "reply": "4.",
        },
    ]
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load_conversations(path, log=lambda *_: None) == [prompt + [{"role": "assistant", "content": "4."}]] * 3
