"""evaluate.py: every policy measured as it was trained, the base model beside it, and bad input refused
before any model is loaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_step import slow_rewards

import evaluate
import train
from conftest import tiny_model_dir, typed, write_pairs
from qadapter_min import UserError, frontier, plots
from qadapter_min.data import collate, encode_pairs, load_pairs
from qadapter_min.lora import adapter_disabled
from qadapter_min.objective import policy_logits
from qadapter_min.policy import load_adapter
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer_file):
    """A tiny model, held-out pairs, and a Q-Adapter and a DPO adapter train.py trained on it."""
    directory = tmp_path_factory.mktemp("evaluate")
    model_dir = tiny_model_dir(directory / "model", tokenizer_file)
    data, held_out = (write_pairs(directory / "pairs.jsonl", n=8), write_pairs(directory / "held_out.jsonl", n=6))
    for objective in ("qadapter", "dpo"):
        flags = ["--model", model_dir, "--data", data, "--out", directory / objective, "--batch_size", 4]
        train.main(typed(*flags, "--max_steps", 4, "--lr", 0.05, "--objective", objective))
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
    pairs = encode_pairs(load_pairs(held_out, log=lambda *_: None), tokenizer, 1024, log=lambda *_: None)
    tokens, response_mask = collate(pairs, tokenizer.eot_id)
    expected = [  # the definition, from full logits: R = sum alpha log pi - alpha0 log pi1 of the policy
        (None, "base", 1.0, 0.0),  # the base model: its log-likelihood
        (qadapter, "customised", 1.0, 0.3),  # --alpha0 overrides the trained 0.01
        (dpo, "adapter", 1.0, 0.0),  # and leaves a DPO adapter a plain model: its log-likelihood
    ]
    for result, (adapter, mode, alpha, alpha0) in zip(results, expected):
        model = load_model(model_dir)
        if adapter is not None:
            load_adapter(model, adapter)
        rewards = slow_rewards(model.eval(), tokens, response_mask, mode, alpha, alpha0)
        chosen, rejected = rewards[: len(pairs)], rewards[len(pairs) :]
        assert result["preference"]["preference_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
        assert result["preference"]["preference_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5)
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
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "Sure! 2 plus 2 is 4."}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 5 plus 5 is 10."}],
    ]
    base_nll = None
    for result, (adapter, mode) in zip(results, [(None, "base"), (qadapter, "customised"), (dpo, "adapter")]):
        model = load_model(model_dir)
        if adapter is not None:
            load_adapter(model, adapter)
        model.eval()  # no LoRA dropout
        total, count = 0.0, 0
        for conversation in conversations:  # the definition, from full logits of the whole conversation
            prompt = tokenizer.encode_chat(conversation[:1], add_generation_prompt=True)
            ids = tokenizer.encode_chat(conversation)  # the reply and its <|eot_id|> after the prompt
            tokens = torch.tensor([ids])
            with torch.no_grad():
                with adapter_disabled(model):
                    base = model(tokens)[0]
                q = model(tokens)[0]
            logits = {"base": base, "adapter": q, "customised": policy_logits(q, base, 1.0, 0.3)}[mode]
            log_pi = logits.log_softmax(-1)
            total -= sum(log_pi[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
            count += len(ids) - len(prompt)
        assert result["reply_nll"]["tokens"] == count
        assert result["reply_nll"]["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
        base_nll = base_nll if base_nll is not None else total / count
        assert result["reply_nll"]["added_to_base"] == pytest.approx(total / count - base_nll, abs=1e-5)


def test_an_adapter_of_another_base_model_is_refused_naming_it(adapters, tmp_path, tokenizer_file):
    model_dir, held_out, qadapter, _ = adapters
    other = tiny_model_dir(tmp_path / "other", tokenizer_file, seed=7)
    with pytest.raises(UserError, match=f"^{qadapter} was trained on another base model than {other}"):
        evaluate.main(["--model", str(other), "--adapter", str(qadapter), "--pairs", str(held_out)])
    train.main(
        typed("--model", other, "--data", held_out, "--out", tmp_path / "out", "--batch_size", 2, "--max_steps", 1)
    )
    with pytest.raises(UserError, match=f"^{tmp_path / 'out'} was trained on another base model than {qadapter}"):
        evaluate.main(["--adapter", str(qadapter), str(tmp_path / "out"), "--pairs", str(held_out)])


def scaled_copy(adapter: Path, factor: float, to: Path) -> Path:
    """The adapter with every B matrix multiplied by factor, as files: the update scaled by hand."""
    shutil.copytree(adapter, to)
    weights = load_file(to / "adapter_model.safetensors")
    scaled = {k: v * factor if "lora_B" in k else v for k, v in weights.items()}
    save_file(scaled, to / "adapter_model.safetensors")
    return to


def test_points_along_scale_and_alpha0_equal_scaled_files_full_logits_and_the_single_point(adapters, tmp_path):
    model_dir, held_out, qadapter, dpo = adapters
    pairs = ["--pairs", str(held_out)]
    grid = ["--scale", "0", "0.5", "1", "--alpha0", "0.01", "0.5"]
    evaluate.main(["--adapter", str(qadapter), str(dpo), *pairs, *grid, "--output", str(tmp_path / "grid.json")])
    points = {r["name"]: r for r in json.loads((tmp_path / "grid.json").read_text())["models"]}
    assert [(r["scale"], r["alpha0"]) for r in points.values()] == [
        (None, None),
        *[(s, a) for s in (0.0, 0.5, 1.0) for a in (0.01, 0.5)],
        (0.0, None),
        (0.5, None),
        (1.0, None),
    ]
    halved = [scaled_copy(a, 0.5, tmp_path / f"{a.name}-halved") for a in (qadapter, dpo)]
    evaluate.main(["--adapter", *map(str, [qadapter, dpo, *halved]), *pairs, "--output", str(tmp_path / "one.json")])
    base, as_trained, dpo_as_trained, q_halved, dpo_halved = (
        r["preference"] for r in json.loads((tmp_path / "one.json").read_text())["models"]
    )

    def at(adapter, knobs):
        return points[f"{adapter}{knobs}"]["preference"]

    assert at(qadapter, " x1 a0 0.01") == as_trained  # the trained alpha0 (0.01), at scale 1
    assert at(dpo, " x1") == dpo_as_trained
    assert at(dpo, " x0") == base  # scale 0 of a DPO adapter: exactly the base model
    for got, want in ((at(qadapter, " x0.5 a0 0.01"), q_halved), (at(dpo, " x0.5"), dpo_halved)):
        assert got == pytest.approx(want, abs=1e-5)
    # alpha0 0.5: R from full logits, with pi~ = softmax((Q + 0.5 log pi1) / alpha)
    tokenizer = Tokenizer(model_dir)
    encoded = encode_pairs(load_pairs(held_out, log=lambda *_: None), tokenizer, 1024, log=lambda *_: None)
    tokens, response_mask = collate(encoded, tokenizer.eot_id)
    model = load_model(model_dir)
    load_adapter(model, qadapter)
    rewards = slow_rewards(model.eval(), tokens, response_mask, "customised", 1.0, 0.5)
    chosen, rejected = rewards[: len(encoded)], rewards[len(encoded) :]
    assert at(qadapter, " x1 a0 0.5")["preference_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert at(qadapter, " x1 a0 0.5")["preference_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5)


def test_the_frontier_marks_the_points_no_other_beats_on_both_metrics():
    points = [(0.0, 1.0), (0.5, 1.0), (0.5, 0.8), (0.9, 0.2), (0.9, 0.2), (0.3, 0.9)]
    assert frontier.frontier(points, "preference_rate", "skill_accuracy") == [
        False,  # (0.5, 1.0) is as good on skill and better on preference
        True,
        False,
        True,  # two equal points: neither beats the other
        True,
        False,
    ]
    # reply NLL: lower is better, so the least NLL at equal preference wins
    assert frontier.frontier([(0.5, 2.0), (0.5, 1.5), (0.1, 1.0)], "preference_accuracy", "reply_nll") == [
        False,
        True,
        True,
    ]


def test_plot_draws_the_frontier_and_the_training_curves_as_png(adapters, tmp_path, capsys):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    _, held_out, qadapter, dpo = adapters
    replies = tmp_path / "replies.jsonl"
    replies.write_text(json.dumps({"prompt": "What is 2 plus 2?", "reply": "4."}) + "\n")
    evaluate.main(
        ["--adapter", str(qadapter), str(dpo), "--pairs", str(held_out), "--reply_nll", str(replies)]
        + ["--scale", "0", "1", "2", "--plot", str(tmp_path / "frontier.png")]
    )
    table = capsys.readouterr().out
    assert "frontier: implicit_reward_accuracy (higher is better) against reply_nll (lower is better)" in table
    plots.main([str(qadapter), str(dpo), "--output", str(tmp_path / "curves.png")])
    for name, (height, width) in (("frontier.png", (480, 640)), ("curves.png", (900, 1260))):  # 8 panels, 3 rows
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib_image.imread(png).shape[:2] == (height, width)


def test_a_plot_without_matplotlib_is_refused_saying_what_to_install(adapters, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(
        UserError, match="^plots need matplotlib, which is not installed: pip install -r requirements-eval.txt"
    ):
        plots.main([str(adapters[2]), "--output", str(tmp_path / "curves.png")])
