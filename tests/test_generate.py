"""Decoding: cached equals recomputed, the combined batch equals two passes, sampling controls, sample.py."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
import train
from conftest import run_script, tiny_args, tiny_chatml_model_dir, tiny_model_dir, typed, write_pairs
from qadapter_min.data import REPLY_KEYS
from qadapter_min.generate import Decoder, generate, generate_batch, sample_token
from qadapter_min.lora import adapter_disabled, add_lora, lora_layers
from qadapter_min.model import Transformer
from qadapter_min.objective import policy_logits
from qadapter_min.policy import load_adapter
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [3, 17, 42, 8, 99, 5]


def random_model_with_adapter(seed=0, trained=True) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    add_lora(model, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    if trained:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(0, 0.5)
    return model.eval()


def slow_greedy(model, prompt, steps, alpha, alpha0, stop_ids=()):
    """The customised policy's greedy reply, recomputing the whole sequence at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.tensor([ids])
            q = model(tokens)[0, -1]
            with adapter_disabled(model):
                base = model(tokens)[0, -1]
            token = int(policy_logits(q, base, alpha, alpha0).argmax())
            if token in stop_ids:
                break
            ids.append(token)
    return ids[len(prompt) :]


def test_greedy_with_a_zero_initialised_adapter_equals_greedy_base():
    model = random_model_with_adapter(trained=False)
    base = list(generate(model, PROMPT, stop_ids=[], max_new_tokens=20, policy_mode="base"))
    customised = list(generate(model, PROMPT, stop_ids=[], max_new_tokens=20, policy_mode="customised", alpha0=0.5))
    assert customised == base


def test_cached_decoding_equals_recomputing_the_whole_sequence_each_step():
    model = random_model_with_adapter()
    got = list(generate(model, PROMPT, stop_ids=[], max_new_tokens=40, policy_mode="customised", alpha=0.8, alpha0=0.3))
    assert got == slow_greedy(model, PROMPT, 40, alpha=0.8, alpha0=0.3)  # 46 positions, past the scaling's 32


def test_the_combined_batch_equals_two_caches_and_two_passes():
    model = random_model_with_adapter()
    combined = Decoder(model, "customised", alpha=1.0, alpha0=0.2, max_seq_len=64, combined=True)
    two_passes = Decoder(model, "customised", alpha=1.0, alpha0=0.2, max_seq_len=64, combined=False)
    a, b = combined.feed(torch.tensor([PROMPT]))[0], two_passes.feed(torch.tensor([PROMPT]))[0]
    for _ in range(25):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        token = int(a.argmax())
        a, b = (combined.feed(torch.tensor([[token]]))[0], two_passes.feed(torch.tensor([[token]]))[0])


def test_generation_stops_at_a_stop_id_without_emitting_it():
    model = random_model_with_adapter()
    free = list(generate(model, PROMPT, stop_ids=[], max_new_tokens=15, policy_mode="customised"))
    stop = free[6]
    first = free.index(stop)
    stopped = list(generate(model, PROMPT, stop_ids=[stop], max_new_tokens=15, policy_mode="customised"))
    assert stopped == free[:first]


def test_the_same_seed_gives_the_same_sample_and_another_seed_another():
    model = random_model_with_adapter()

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return list(
            generate(
                model,
                PROMPT,
                stop_ids=[],
                max_new_tokens=30,
                policy_mode="customised",
                temperature=1.0,
                generator=generator,
            )
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5])
    generator = torch.Generator().manual_seed(0)
    assert sample_token(logits, 0.0, 0, 1.0, generator) == 1
    assert {sample_token(logits, 1.0, 1, 1.0, generator) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, 0, 0.01, generator) for _ in range(20)} == {1}
    # p(1) ~ 0.45 and p(2) ~ 0.41 cover 0.8: only tokens 1 and 2 remain
    assert {sample_token(logits, 1.0, 0, 0.8, generator) for _ in range(200)} == {1, 2}
    assert {sample_token(logits, 1.0, 2, 1.0, generator) for _ in range(200)} == {1, 2}


def train_an_adapter(model_dir: Path, directory: Path):
    """(model_dir, an adapter that train.py trained on it with a high learning rate)."""
    data = write_pairs(directory / "pairs.jsonl", n=8)
    flags = ["--model", model_dir, "--data", data, "--out", directory / "out", "--batch_size", 4, "--max_steps", 6]
    train.main(typed(*flags, "--lr", 0.05, "--alpha0", 0.3))
    return model_dir, directory / "out"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_file):
    """A tiny model directory (Llama 3.1's chat format) and an adapter trained on it."""
    directory = tmp_path_factory.mktemp("sample")
    return train_an_adapter(tiny_model_dir(directory / "model", tokenizer_file), directory)


@pytest.fixture(scope="module")
def trained_chatml(tmp_path_factory):
    """The same with a ChatML tokenizer (SmolLM2's format)."""
    directory = tmp_path_factory.mktemp("sample-chatml")
    return train_an_adapter(tiny_chatml_model_dir(directory / "model"), directory)


def run_sample(*flags):
    return run_script(sample.main, *flags)


@pytest.mark.parametrize("setup", ["trained", "trained_chatml"])
def test_sample_py_prints_the_customised_policys_greedy_reply(setup, request):
    model_dir, adapter = request.getfixturevalue(setup)
    prompt = "What is 3 plus 3?"
    result = run_sample("--adapter", adapter, "--prompt", prompt, "--temperature", 0, "--max_new_tokens", 24)
    assert result.returncode == 0, result.stderr

    tokenizer = Tokenizer(model_dir)
    model = load_model(model_dir)
    load_adapter(model, adapter)
    model.eval()
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    expected = slow_greedy(model, prompt_ids, 24, alpha=1.0, alpha0=0.3, stop_ids=tokenizer.stop_ids)
    with adapter_disabled(model):
        base = slow_greedy(model, prompt_ids, 24, alpha=1.0, alpha0=0.0, stop_ids=tokenizer.stop_ids)
    assert expected != base  # the adapter changed the reply, so the check below means something
    assert result.stdout == tokenizer.decode(expected) + "\n"

    compared = run_sample(
        "--adapter", adapter, "--prompt", prompt, "--temperature", 0, "--max_new_tokens", 24, "--compare"
    )
    assert compared.stdout == f"[base]\n{tokenizer.decode(base)}\n[customised]\n{tokenizer.decode(expected)}\n"


def test_sample_py_refuses_an_adapter_trained_on_another_base_model(trained, tmp_path, tokenizer_file):
    _, adapter = trained
    other = tiny_model_dir(tmp_path / "other", tokenizer_file, seed=5)
    result = run_sample("--adapter", adapter, "--model", other, "--prompt", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {adapter} was trained on another base model")


def mixed_prompts(count=20, seed=0):
    """Prompts of 3 to 30 tokens: the longest ten times the shortest."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 30] + [int(torch.randint(3, 31, (1,), generator=generator)) for _ in range(count - 2)]
    return [torch.randint(3, 101, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("policy_mode", ["base", "adapter", "customised"])
def test_a_batch_of_prompts_of_mixed_lengths_gets_exactly_the_replies_of_one_prompt_at_a_time(policy_mode):
    model = random_model_with_adapter()
    prompts = mixed_prompts()
    settings = dict(stop_ids=[1, 2], max_new_tokens=12, policy_mode=policy_mode, alpha=1.0, alpha0=0.3)
    alone = [list(generate(model, prompt, **settings)) for prompt in prompts]
    assert len({len(reply) for reply in alone}) > 1  # some rows stop early, so finished rows are exercised
    for batch_size in (1, 3, 8):
        batched = []
        for start in range(0, len(prompts), batch_size):
            batched += generate_batch(model, prompts[start : start + batch_size], **settings)
        assert batched == alone, batch_size


def test_the_first_logits_of_a_padded_batch_are_those_of_each_prompt_alone():
    model = random_model_with_adapter()
    prompts = mixed_prompts(count=8)
    longest = max(map(len, prompts))
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts])
    for policy_mode in ("base", "adapter", "customised"):
        batched = Decoder(model, policy_mode, alpha0=0.3, max_seq_len=64, batch_size=8, padded=True).feed(tokens, valid)
        for i, prompt in enumerate(prompts):
            alone = Decoder(model, policy_mode, alpha0=0.3, max_seq_len=64).feed(torch.tensor([prompt]))[0]
            torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)  # logits up to ~10: fp32 rounding


def test_with_sampling_a_prompts_reply_does_not_depend_on_its_batch():
    model = random_model_with_adapter()
    prompts = mixed_prompts(count=6)
    settings = dict(
        stop_ids=[1, 2], max_new_tokens=10, policy_mode="customised", alpha0=0.3, temperature=1.0, top_p=0.9
    )

    def seeded(indices):
        return [torch.Generator().manual_seed(1000 + i) for i in indices]  # one generator per prompt, by its number

    together = generate_batch(model, prompts, generators=seeded(range(6)), **settings)
    alone = [generate_batch(model, [prompts[i]], generators=seeded([i]), **settings)[0] for i in range(6)]
    reordered = generate_batch(model, prompts[::-1], generators=seeded(range(5, -1, -1)), **settings)[::-1]
    assert together == alone == reordered
    assert len({tuple(reply) for reply in together}) > 1  # sampling, not one fixed reply


def write_prompts(path: Path, count: int) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"What is {i} plus {i % 7}? " * (1 + i % 5)}) + "\n" for i in range(count))
    )
    return path


def test_unique_replies_once_to_each_distinct_prompt(trained, tmp_path):
    _, adapter = trained
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}, {"prompt": " a "}, {"prompt": "b"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_sample(
        "--adapter",
        adapter,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "out.jsonl",
        "--unique",
        "--max_new_tokens",
        3,
        "--temperature",
        0,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    replied = [{k: v for k, v in line.items() if k not in REPLY_KEYS} for line in lines]
    assert replied == records[:2]  # " a " is "a"; "b" is b's


def test_a_prompts_run_killed_midway_continues_to_the_output_of_an_uninterrupted_run(trained, tmp_path):
    _, adapter = trained
    prompts = write_prompts(tmp_path / "prompts.jsonl", 24)
    flags = ["--adapter", adapter, "--prompts", prompts, "--batch_size", 3, "--max_new_tokens", 12]  # sampling at 0.6
    whole = run_sample(*flags, "--out", tmp_path / "whole.jsonl")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed.jsonl"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "sample.py"), *map(str, flags), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while process.poll() is None and time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 6):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < out.read_text().count("\n") < 24  # killed in the middle
    with open(out, "a") as f:
        f.write('{"prompt": "a half-writ')  # as if the kill had landed inside a write
    resumed = run_sample(*flags, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_a_prompts_file_is_continued_only_with_the_flags_that_began_it(trained, tmp_path):
    """One run per output file: resumed with another adapter, model, temperature or seed, --out is
    refused naming the flag; finished, it says so and does nothing."""
    model_dir, adapter = trained
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    out = tmp_path / "replies.jsonl"
    flags = ["--prompts", prompts, "--out", out, "--max_new_tokens", 4]
    assert run_sample("--adapter", adapter, *flags).returncode == 0
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))  # as if stopped after 2 prompts
    other_model = tiny_model_dir(tmp_path / "other-model", model_dir / "tokenizer.json", seed=1)
    for changed, flag in [
        (["--model", model_dir], "--adapter"),  # the base model alone: no adapter
        (["--model", other_model], "--model"),
        (["--adapter", adapter, "--temperature", 0.9], "--temperature"),
        (["--adapter", adapter, "--seed", 7], "--seed"),
    ]:
        result = run_sample(*changed, *flags)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"holds replies sampled with {flag} " in result.stderr, result.stderr
    assert out.read_text().count("\n") == 2  # nothing mixed in
    assert run_sample("--adapter", adapter, *flags).returncode == 0
    assert out.read_text() == whole  # the same flags continue it to the uninterrupted file
    finished = run_sample("--adapter", adapter, *flags)
    assert finished.returncode == 0 and "holds replies to all 6 prompts already" in finished.stderr
    assert out.read_text() == whole


@pytest.mark.parametrize(
    "text, message",
    [
        (None, r"does not exist"),
        ("", r"is empty"),
        ('{"prompt": "hi"}\nnot json\n', r"line 2 is not JSON"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            r"line 1 holds no conversation to reply to",
        ),
    ],
)
def test_a_bad_prompts_file_is_refused_in_one_line_naming_it(trained, tmp_path, text, message):
    _, adapter = trained
    path = tmp_path / "prompts.jsonl"
    if text is not None:
        path.write_text(text)
    result = run_sample("--adapter", adapter, "--prompts", path, "--out", tmp_path / "r.jsonl")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr) and "prompts.jsonl" in result.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_alpha0_is_refused_for_a_dpo_adapter_where_it_means_nothing(trained, tmp_path):
    model_dir, _ = trained
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    flags = ["--model", model_dir, "--data", data, "--out", tmp_path / "dpo", "--batch_size", 4, "--max_steps", 1]
    train.main(typed(*flags, "--objective", "dpo"))
    result = run_sample("--adapter", tmp_path / "dpo", "--prompt", "hi", "--alpha0", "0.5")
    assert result.returncode == 2 and "is a dpo adapter, sampled with the adapter on; drop --alpha0" in result.stderr
    assert run_sample("--adapter", tmp_path / "dpo", "--prompt", "hi", "--max_new_tokens", 3).returncode == 0
