"""evaluate.py: every policy measured as it was trained, the base model beside it, and bad input refused
before any model is loaded."""

import json
from pathlib import Path

import pytest
import torch
from test_step import slow_rewards

import evaluate
import train
from conftest import run_script, tiny_model_dir, write_pairs
from qadapter_min import UserError
from qadapter_min.adapters import load_adapter
from qadapter_min.data import collate, encode_pairs, load_pairs
from qadapter_min.lora import adapter_disabled
from qadapter_min.objective import policy_logits
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer_file):
    """A tiny model, held-out pairs, and a Q-Adapter and a DPO adapter train.py trained on it."""
    directory = tmp_path_factory.mktemp("evaluate")
    model_dir = tiny_model_dir(directory / "model", tokenizer_file)
    data, held_out = (
        write_pairs(directory / "pairs.jsonl", n=8),
        write_pairs(directory / "held_out.jsonl", n=6),
    )
    for objective in ("qadapter", "dpo"):
        train.main(
            [
                str(f)
                for f in [
                    "--model",
                    model_dir,
                    "--data",
                    data,
                    "--out",
                    directory / objective,
                    "--batch_size",
                    4,
                    "--max_steps",
                    4,
                    "--lr",
                    0.05,
                    "--objective",
                    objective,
                ]
            ]
        )
    return model_dir, held_out, directory / "qadapter", directory / "dpo"


def test_each_adapter_is_measured_as_the_policy_it_was_trained_for(adapters, tmp_path, capsys):
    model_dir, held_out, qadapter, dpo = adapters
    evaluate.main(
        [
            "--adapter",
            str(qadapter),
            str(dpo),
            "--pairs",
            str(held_out),
            "--alpha0",
            "0.3",
            "--output",
            str(tmp_path / "results.json"),
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())["models"]
    assert [(r["name"], r["policy"], r["adapter"]) for r in results] == [
        ("base", "base", None),
        (str(qadapter), "customised", str(qadapter)),
        (str(dpo), "adapter", str(dpo)),
    ]
    tokenizer = Tokenizer(model_dir)
    pairs = encode_pairs(
        load_pairs(held_out, log=lambda *_: None), tokenizer, 1024, log=lambda *_: None
    )
    tokens, response_mask = collate(pairs, tokenizer.eot_id)
    expected = [  # the definition, from full logits: R = sum alpha log pi - alpha0 log pi1 of the policy
        (None, "base", 1.0, 0.0),  # the base model: its log-likelihood
        (qadapter, "customised", 1.0, 0.3),  # --alpha0 overrides the trained 0.01
        (dpo, "adapter", 1.0, 0.01),  # and leaves a DPO adapter as it was
    ]
    for result, (adapter, mode, alpha, alpha0) in zip(results, expected):
        model = load_model(model_dir)
        if adapter is not None:
            load_adapter(model, adapter)
        rewards = slow_rewards(model.eval(), tokens, response_mask, mode, alpha, alpha0)
        chosen, rejected = rewards[: len(pairs)], rewards[len(pairs) :]
        assert result["preference"]["preference_accuracy"] == pytest.approx(
            (chosen > rejected).float().mean().item()
        )
        assert result["preference"]["preference_margin"] == pytest.approx(
            (chosen - rejected).mean().item(), rel=1e-5
        )
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["base", qadapter.name, dpo.name]  # the directories by name


def test_reply_nll_is_each_policys_mean_negative_log_likelihood_per_reply_token(adapters, tmp_path):
    model_dir, _, qadapter, dpo = adapters
    replies = tmp_path / "replies.jsonl"  # sample.py's output, and a messages record
    replies.write_text(
        json.dumps({"prompt": "What is 2 plus 2?", "reply": "Sure! 2 plus 2 is 4."})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "Hello! 5 plus 5 is 10."},
                ]
            }
        )
        + "\n"
    )
    evaluate.main(
        [
            "--adapter",
            str(qadapter),
            str(dpo),
            "--reply_nll",
            str(replies),
            "--alpha0",
            "0.3",
            "--output",
            str(tmp_path / "results.json"),
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())["models"]
    tokenizer = Tokenizer(model_dir)
    conversations = [
        [
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "Sure! 2 plus 2 is 4."},
        ],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello! 5 plus 5 is 10."},
        ],
    ]
    base_nll = None
    for result, (adapter, mode) in zip(
        results, [(None, "base"), (qadapter, "customised"), (dpo, "adapter")]
    ):
        model = load_model(model_dir)
        if adapter is not None:
            load_adapter(model, adapter)
        model.eval()  # no LoRA dropout
        total, count = 0.0, 0
        for (
            conversation
        ) in conversations:  # the definition, from full logits of the whole conversation
            prompt = tokenizer.encode_chat(conversation[:1], add_generation_prompt=True)
            ids = tokenizer.encode_chat(
                conversation
            )  # the reply and its <|eot_id|> after the prompt
            tokens = torch.tensor([ids])
            with torch.no_grad():
                with adapter_disabled(model):
                    base = model(tokens)[0]
                q = model(tokens)[0]
            logits = {"base": base, "adapter": q, "customised": policy_logits(q, base, 1.0, 0.3)}[
                mode
            ]
            log_pi = logits.log_softmax(-1)
            total -= sum(log_pi[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
            count += len(ids) - len(prompt)
        assert result["reply_nll"]["tokens"] == count
        assert result["reply_nll"]["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
        base_nll = base_nll if base_nll is not None else total / count
        assert result["reply_nll"]["added_to_base"] == pytest.approx(
            total / count - base_nll, abs=1e-5
        )


def test_an_adapter_of_another_base_model_is_refused_naming_it(adapters, tmp_path, tokenizer_file):
    model_dir, held_out, qadapter, _ = adapters
    other = tiny_model_dir(tmp_path / "other", tokenizer_file, seed=7)
    with pytest.raises(
        UserError, match=f"^{qadapter} was trained on another base model than {other}"
    ):
        evaluate.main(["--model", str(other), "--adapter", str(qadapter), "--pairs", str(held_out)])
    train.main(
        [
            str(f)
            for f in [
                "--model",
                other,
                "--data",
                held_out,
                "--out",
                tmp_path / "out",
                "--batch_size",
                2,
                "--max_steps",
                1,
            ]
        ]
    )
    with pytest.raises(
        UserError, match=f"^{tmp_path / 'out'} was trained on another base model than {qadapter}"
    ):
        evaluate.main(["--adapter", str(qadapter), str(tmp_path / "out"), "--pairs", str(held_out)])


@pytest.mark.parametrize(
    "case",
    ["not an adapter", "empty pairs", "missing pairs", "output is a directory", "missing replies"],
)
def test_bad_input_is_refused_in_one_sentence_with_exit_code_2_and_nothing_written(
    adapters, tmp_path, case
):
    model_dir, held_out, qadapter, _ = adapters
    (tmp_path / "empty.jsonl").write_text("")
    flags, message = {
        "not an adapter": (
            ["--adapter", str(model_dir)],
            f"{model_dir}/qadapter_config.json does not exist",
        ),
        "empty pairs": (
            ["--adapter", str(qadapter), "--pairs", str(tmp_path / "empty.jsonl")],
            f"{tmp_path / 'empty.jsonl'} holds no usable preference pair",
        ),
        "missing pairs": (
            ["--adapter", str(qadapter), "--pairs", str(tmp_path / "nowhere.jsonl")],
            f"{tmp_path / 'nowhere.jsonl'} does not exist",
        ),
        "output is a directory": (
            ["--adapter", str(qadapter), "--output", str(tmp_path)],
            f"--output {tmp_path} is a directory",
        ),
        "missing replies": (
            ["--adapter", str(qadapter), "--reply_nll", str(tmp_path / "nowhere.jsonl")],
            f"--reply_nll {tmp_path / 'nowhere.jsonl'} is not a file",
        ),
    }[case]
    output = [] if case == "output is a directory" else ["--output", str(tmp_path / "results.json")]
    result = run_script(evaluate.main, *flags, *output)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert not (tmp_path / "results.json").exists()
