"""Judging replies: a reward model in the LlamaForSequenceClassification layout scores as transformers does,
and evaluate.py --prompts --reward_model reports each model's mean reward and win rate against the base."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import torchrun

import evaluate
import train
from conftest import run_script
from qadapter_min import run_dir
from qadapter_min.data import Pair, load_pairs
from qadapter_min.flags import parse_args
from qadapter_min.generate import generate_batch
from qadapter_min.judge import check_reward_model, load_reward_model, rewards, win_rate
from qadapter_min.policy import load_adapter
from qadapter_min.reward import reward_model_pairs
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
    got = rewards(load_reward_model(REWARD), golden["input_ids"], batch_size=2)  # padded batches of 2 and 1
    assert got == pytest.approx(golden["rewards"], abs=1e-4)


def test_a_win_counts_one_a_tie_half_a_loss_nothing():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, -1.0]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)


def test_evaluate_judges_each_models_greedy_replies(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    questions = ["What is the capital of Peru?", "Name a colour.", "Say a word.", "What is two plus two?", "hi"]
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
    records = [json.loads(line) for line in (tmp_path / "results.replies.jsonl").read_text().splitlines()]
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
                model.eval(), prompt_ids, stop_ids=tokenizer.stop_ids, max_new_tokens=6, policy_mode=mode
            )
        ]
        assert [r["replies"][name] for r in records] == replies  # greedy, one batch here, batches of 2 there
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


@pytest.mark.parametrize(
    "case", ["no score head", "two labels", "an adapter", "no pad token id", "empty prompts", "prompts alone"]
)
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
    if case == "an adapter":
        reward = ADAPTER
    if case == "no pad token id":
        reward = tmp_path / "no-pad"
        shutil.copytree(REWARD, reward)
        config = json.loads((reward / "config.json").read_text())
        (reward / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    flags = ["--prompts", str(prompts)] + ([] if case == "prompts alone" else ["--reward_model", str(reward)])
    message = {
        "no score head": f"{MODEL} has no score.weight; a reward model is a Llama in the "
        "LlamaForSequenceClassification layout",
        "two labels": f"{reward / 'model.safetensors'}: score.weight has 2 labels; a reward model has one",
        "an adapter": f"--reward_model {ADAPTER} is an adapter, not a reward model",
        "no pad token id": f"{reward / 'config.json'} has no pad_token_id",
        "empty prompts": f"--prompts {prompts} is empty",
        "prompts alone": "--prompts FILE and --reward_model RM go together",
    }[case]
    result = run_script(evaluate.main, "--model", "nowhere", *flags, "--output", str(tmp_path / "r.json"))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "r.json").exists()


TRAINED = ROOT / "tests" / "fixtures" / "trained-reward"


@pytest.fixture(scope="module")
def trained_reward_model(tmp_path_factory) -> Path:
    """train.py --objective rm on the trained-reward fixture's pairs, as tools/make_golden.py ran it."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    train.main(
        ["--model", str(MODEL), "--data", str(TRAINED / "pairs.jsonl"), "--out", str(out)]
        + json.loads((TRAINED / "golden.json").read_text())["flags"]
    )
    return out


def test_a_reward_model_trained_here_scores_as_transformers_scores_it(trained_reward_model):
    """transformers' AutoModelForSequenceClassification read train.py's output as it is and scored a
    right-padded batch (golden.json); evaluate.py's reader gives the same rewards."""
    golden = json.loads((TRAINED / "golden.json").read_text())
    assert [Tokenizer(trained_reward_model).encode_chat(c) for c in golden["conversations"]] == (golden["input_ids"])
    got = rewards(load_reward_model(check_reward_model(trained_reward_model)), golden["input_ids"])
    assert got == pytest.approx(golden["rewards"], abs=1e-5)
    assert max(golden["rewards"]) - min(golden["rewards"]) > 0.1  # training moved the head off 0


def test_a_reward_model_is_written_whole_in_the_sequence_classification_layout(trained_reward_model):
    """The merged weights without the base's LM head, a one-row fp32 score head, a config that names the
    architecture, one label and the pad token, the tokenizer, the model card; no adapter files."""
    tensors = load_file(trained_reward_model / "model.safetensors")
    base = load_file(MODEL / "model.safetensors")
    assert set(tensors) == (set(base) - {"lm_head.weight"}) | {"score.weight"}
    assert tensors["score.weight"].shape == (1, 64) and tensors["score.weight"].abs().max() > 0
    merged = [n for n in tensors if n.endswith(("q_proj.weight", "v_proj.weight"))]
    assert merged and all(not torch.equal(tensors[n], base[n]) for n in merged)
    assert all(torch.equal(tensors[n], base[n]) for n in tensors if "proj" in n and n not in merged)
    config = json.loads((trained_reward_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0"}
    assert config["pad_token_id"] == Tokenizer(MODEL).pad_id
    names = {p.name for p in trained_reward_model.iterdir()}
    assert {"tokenizer.json", "README.md", "metrics.jsonl", "qadapter_config.json"} <= names
    assert not names & {"adapter_model.safetensors", "adapter_config.json", "checkpoint"}
    assert "# A reward model of" in (trained_reward_model / "README.md").read_text()


def test_a_reward_model_trained_on_the_built_in_world_separates_its_held_out_pairs(tmp_path):
    """Trained on the world's preference (replies that start with "Sure! "), it ranks the held-out
    pairs' chosen reply above the rejected one, read back through evaluate.py's reader."""
    out = tmp_path / "rm"
    train.main(["--objective", "rm", "--max_steps", "8", "--lr", "3e-2", "--out", str(out)])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_reward_accuracy"] >= 0.95  # the world's test.jsonl, as train.py evaluates it
    tokenizer, model = Tokenizer(out), load_reward_model(check_reward_model(out))
    pairs = load_pairs(ROOT / "toyworld" / "test.jsonl", log=lambda *_: None)
    chosen = rewards(model, [tokenizer.encode_chat(p.chosen) for p in pairs])
    rejected = rewards(model, [tokenizer.encode_chat(p.rejected) for p in pairs])
    assert len(pairs) == 96
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) >= 0.95


def assert_same_reward_model(got: Path, want: Path):
    got_tensors, want_tensors = (load_file(got / "model.safetensors"), load_file(want / "model.safetensors"))
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        torch.testing.assert_close(got_tensors[name], tensor, rtol=0, atol=1e-5)


def test_a_reward_model_keeps_train_pys_contract_over_processes_shards_and_resume(tmp_path, monkeypatch):
    """Two processes (DDP), and two sharded processes (FSDP) resuming a one-process checkpoint, give
    the reward model of one uninterrupted process."""
    data = TRAINED / "pairs.jsonl"
    flags = ["--model", MODEL, "--data", data, "--objective", "rm", "--batch_size", 4]
    flags += ["--micro_batch_size", 1, "--max_steps", 4, "--lr", 0.01, "--dtype", "fp32", "--max_len", 128]
    flags += ["--save_every", 2]
    train.main([str(f) for f in flags + ["--out", tmp_path / "one"]])
    torchrun(*flags, "--out", tmp_path / "two")
    assert_same_reward_model(tmp_path / "two", tmp_path / "one")
    power_cut = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("power cut"))  # noqa: E731
    monkeypatch.setattr(run_dir, "save_reward_model", power_cut)  # after the step-2 checkpoint
    with pytest.raises(RuntimeError):
        train.main([str(f) for f in flags + ["--out", tmp_path / "resumed"]])
    torchrun(*flags, "--out", tmp_path / "resumed", "--resume", "--fsdp")
    assert_same_reward_model(tmp_path / "resumed", tmp_path / "one")


@pytest.mark.parametrize("case", ["dsp without a domain", "plain text", "sft only", "resume as dpo"])
def test_bad_input_to_a_reward_model_is_one_sentence_and_nothing_is_written(tmp_path, case):
    data = tmp_path / "data.jsonl"
    data.write_text(
        {
            "dsp without a domain": json.dumps(
                {"query": "q", "responses": {d: d for d in ("academy", "business", "entertainment", "literature")}}
            ),
            "plain text": json.dumps("just some text"),
            "sft only": json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            ),
            "resume as dpo": (TRAINED / "pairs.jsonl").read_text(),
        }[case]
        + "\n"
    )
    out = tmp_path / "out"
    flags = ["--model", MODEL, "--data", data, "--batch_size", 1, "--max_len", 128, "--out", out]
    if case == "resume as dpo":
        (out / "checkpoint").mkdir(parents=True)
        made_with = vars(parse_args([str(f) for f in flags + ["--objective", "rm"]]))
        torch.save({"step": 1, "flags": made_with}, out / "checkpoint" / "state.pt")
        flags += ["--objective", "dpo", "--resume"]
    else:
        flags += ["--objective", "rm"]
    message = {
        "dsp without a domain": "is DSP data, which needs a domain: pass --domain",
        "plain text": "is in no known preference format",
        "sft only": "is in no known preference format",
        "resume as dpo": "was made with other flags (--objective);",
    }[case]
    before = sorted(tmp_path.rglob("*"))
    result = run_script(train.main, *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("tokenizer_dir", [MODEL, ROOT / "tests" / "fixtures" / "tiny-chatml"])
def test_a_reward_model_trains_on_each_conversation_as_the_template_renders_it(tokenizer_dir):
    """Its reward is read at the last token of the rendered conversation, where evaluate.py and
    transformers read it: ChatML's newline after <|im_end|> included, Llama 3.1's <|eot_id|> last."""
    tokenizer = Tokenizer(tokenizer_dir)
    prompt = [{"role": "user", "content": "Name a colour."}]
    chosen, rejected = (prompt + [{"role": "assistant", "content": c}] for c in ("Blue.", "No."))
    (pair,) = reward_model_pairs([Pair(chosen, rejected, "x:1")], tokenizer, 256, log=lambda *_: None)
    assert pair.chosen == tokenizer.encode_chat(chosen)
    assert pair.rejected == tokenizer.encode_chat(rejected)
    assert pair.chosen[-1] != tokenizer.pad_id
