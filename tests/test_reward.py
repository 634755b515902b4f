"""Judging replies: a reward model in the LlamaForSequenceClassification layout scores as transformers does,
and evaluate.py --prompts --reward_model reports each model's mean reward and win rate against the base."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import evaluate
from conftest import run_script
from qadapter_min.adapters import load_adapter
from qadapter_min.generate import generate_batch
from qadapter_min.reward import load_reward_model, rewards, win_rate
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
REWARD = ROOT / "tests" / "fixtures" / "tiny-reward-llama"
MODEL, ADAPTER = (
    ROOT / "tests" / "fixtures" / "lm-eval-llama" / "model",
    ROOT / "tests" / "fixtures" / "lm-eval-llama" / "adapter",
)


def test_rewards_equal_transformers_sequence_classification():
    golden = json.loads((REWARD / "golden.json").read_text())
    tokenizer = Tokenizer(REWARD)
    assert [tokenizer.encode_chat(c) for c in golden["conversations"]] == golden["input_ids"]
    got = rewards(
        load_reward_model(REWARD), golden["input_ids"], batch_size=2
    )  # padded batches of 2 and 1
    assert got == pytest.approx(golden["rewards"], abs=1e-4)


def test_a_win_counts_one_a_tie_half_a_loss_nothing():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, -1.0]) == pytest.approx(
        (0.5 + 1 + 0 + 1) / 4
    )


def test_evaluate_judges_each_models_greedy_replies(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    questions = [
        "What is the capital of Peru?",
        "Name a colour.",
        "Say a word.",
        "What is two plus two?",
        "hi",
    ]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    evaluate.main(
        [
            "--model",
            str(MODEL),
            "--adapter",
            str(ADAPTER),
            "--prompts",
            str(prompts),
            "--reward_model",
            str(REWARD),
            "--max_new_tokens",
            "6",
            "--batch_size",
            "2",
            "--output",
            str(tmp_path / "results.json"),
        ]
    )
    base, adapter = json.loads((tmp_path / "results.json").read_text())["models"]
    records = [
        json.loads(line) for line in (tmp_path / "results.replies.jsonl").read_text().splitlines()
    ]
    assert [r["messages"] for r in records] == [[{"role": "user", "content": q}] for q in questions]
    tokenizer, reward_model = Tokenizer(MODEL), load_reward_model(REWARD)
    model = load_model(MODEL)
    load_adapter(model, ADAPTER)
    prompt_ids = [tokenizer.encode_chat(r["messages"], add_generation_prompt=True) for r in records]
    for result, mode in ((base, "base"), (adapter, "adapter")):
        name = result["name"]
        replies = [
            tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_batch(
                model.eval(),
                prompt_ids,
                stop_ids=tokenizer.stop_ids,
                max_new_tokens=6,
                policy_mode=mode,
            )
        ]
        assert [
            r["replies"][name] for r in records
        ] == replies  # greedy, one batch here, batches of 2 there
        conversations = [
            tokenizer.encode_chat(r["messages"] + [{"role": "assistant", "content": reply}])
            for r, reply in zip(records, replies)
        ]
        scores = rewards(reward_model, conversations)
        assert [r["rewards"][name] for r in records] == pytest.approx(scores, abs=1e-5)
        assert result["reward"]["mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
        assert result["reward"]["win_rate_against_base"] == win_rate(
            [r["rewards"][name] for r in records], [r["rewards"]["base"] for r in records]
        )
    assert base["reward"]["win_rate_against_base"] == 0.5


@pytest.mark.parametrize("case", ["no score head", "two labels", "empty prompts", "prompts alone"])
def test_a_bad_reward_model_or_prompts_file_is_refused_before_any_model_is_loaded(tmp_path, case):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("" if case == "empty prompts" else '{"prompt": "hi"}\n')
    reward = REWARD
    if case == "two labels":
        reward = tmp_path / "two-labels"
        shutil.copytree(REWARD, reward)
        state = load_file(reward / "model.safetensors")
        state["score.weight"] = state["score.weight"].repeat(2, 1)
        save_file(state, reward / "model.safetensors")
    if case == "no score head":
        reward = MODEL  # a causal LM, not a reward model
    flags = ["--prompts", str(prompts)] + (
        [] if case == "prompts alone" else ["--reward_model", str(reward)]
    )
    message = {
        "no score head": f"{MODEL} has no score.weight; a reward model is a Llama in the "
        "LlamaForSequenceClassification layout",
        "two labels": f"{reward / 'model.safetensors'}: score.weight has 2 labels; a reward model has one",
        "empty prompts": f"--prompts {prompts} is empty",
        "prompts alone": "--prompts FILE and --reward_model RM go together",
    }[case]
    result = run_script(
        evaluate.main, "--model", "nowhere", *flags, "--output", str(tmp_path / "r.json")
    )
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "r.json").exists()
