"""--compile: compiled decoding gives eager decoding's greedy replies token for token, for every policy
alone and batched, and sample.py's replies file; a decoding step compiles once per batch shape; and a
compiled training run gives an eager run's loss and adapter, with checkpointing too.

Each test runs under two of torch.compile's backends (compiled.BACKEND). aot_eager captures the
graphs that --compile compiles, forward and backward, and runs them with PyTorch's kernels: seconds,
in the suite. inductor is --compile itself: its code generation costs 15-40 s per trace on 2 cores,
minutes for these tests from a cold cache, so those are marked slow (python -m pytest -m slow)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_generate import train_an_adapter, write_prompts
from torch._dynamo.testing import CompileCounter

import sample
import train
from conftest import run_script, tiny_args, tiny_model_dir, write_pairs
from qadapter_min import compiled as compiled_steps
from qadapter_min.generate import generate, generate_batch
from qadapter_min.lora import add_lora, lora_layers
from qadapter_min.model import Transformer
from qadapter_min.weights import load_model

PROMPTS = [[5, 9, 14, 3, 22], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def backend(request, monkeypatch):
    """compiled.BACKEND for one test, with dynamo's traces of other backends forgotten."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_steps, "BACKEND", request.param)
    yield request.param
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_file):
    model = load_model(tiny_model_dir(tmp_path_factory.mktemp("compiled"), tokenizer_file)).eval()
    torch.manual_seed(0)
    add_lora(model, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():  # an adapter that moves the logits, so the three policies differ
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("policy_mode", ["base", "adapter", "customised"])
@torch.no_grad()
def test_compiled_greedy_replies_equal_eager_ones_alone_and_batched(model, policy_mode, backend):
    settings = dict(stop_ids=[], max_new_tokens=12, policy_mode=policy_mode, alpha0=0.3)
    eager = [list(generate(model, p, **settings)) for p in PROMPTS]
    assert len({tuple(reply) for reply in eager}) > 1  # replies that a wrong mask would change
    assert [list(generate(model, p, **settings, compiled=True)) for p in PROMPTS] == eager
    assert generate_batch(model, PROMPTS, **settings, compiled=True) == eager


def test_sample_py_with_compile_writes_the_replies_file_of_an_eager_run(tmp_path, tokenizer_file, backend):
    """A Q-Adapter adapter, so the customised policy's combined batch; 7 prompts in batches of 3: two
    batch shapes, and stop ids that end replies early."""
    _, adapter = train_an_adapter(tiny_model_dir(tmp_path / "model", tokenizer_file), tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 7)
    flags = ["--adapter", adapter, "--prompts", prompts, "--batch_size", 3, "--temperature", 0]
    flags += ["--max_new_tokens", 10]
    for name, more in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.utils.counters.clear()
        result = run_script(sample.main, *flags, *more, "--out", tmp_path / f"{name}.jsonl")
        assert result.returncode == 0, result.stderr
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # batches of 3 and of 1
    eager = (tmp_path / "eager.jsonl").read_text()
    assert eager.count("\n") == 7 and (tmp_path / "compiled.jsonl").read_text() == eager
    assert '"finish_reason": "stop"' in eager and '"finish_reason": "length"' in eager


@torch.no_grad()
def test_a_finished_row_stays_in_a_compiled_batch_and_the_others_decode_on(model, backend):
    """A stop id ends one reply early; the compiled batch keeps its row (same shapes) and the other
    replies are those decoded alone."""
    settings = dict(max_new_tokens=12, policy_mode="customised", alpha0=0.3)
    free = [list(generate(model, p, stop_ids=[], **settings)) for p in PROMPTS]
    stop = free[0][3]  # prompt 0's fourth token
    alone = [list(generate(model, p, stop_ids=[stop], **settings)) for p in PROMPTS]
    assert len(alone[0]) == free[0].index(stop)
    assert generate_batch(model, PROMPTS, stop_ids=[stop], **settings, compiled=True) == alone


@torch.no_grad()
def test_a_decoding_step_compiles_once_per_batch_shape(model, monkeypatch):
    """Every step of a reply reuses one trace (the cache keeps its shapes), and so does another batch
    of prompts of other lengths; one prompt alone is a new shape."""
    counter = CompileCounter()  # a backend that counts the graphs it is given
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_steps, "BACKEND", counter)
    settings = dict(stop_ids=[], max_new_tokens=12, policy_mode="customised", compiled=True)
    generate_batch(model, PROMPTS, **settings)
    assert counter.frame_count == 1  # 11 one-token steps
    generate_batch(model, [[4, *p, 6] for p in PROMPTS], **settings)
    assert counter.frame_count == 1
    list(generate(model, PROMPTS[0], **settings))
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_one_trace_serves_every_block_of_a_compiled_training_step(monkeypatch):
    """Four blocks, LoRA dropout keyed by each layer's number: a step traces a block three ways (the
    first block's input needs no gradient, the others' do, the base pass needs none), whatever the
    number of blocks; a second length traces each of the three once more, for every length after it."""
    counter = CompileCounter()
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_steps, "BACKEND", counter)
    torch.manual_seed(0)
    model = Transformer(tiny_args(num_hidden_layers=4)).train()
    add_lora(model, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    for layer in lora_layers(model).values():
        layer.dropout_keys = torch.tensor([3, 4])
    compiled_steps.compile_for_training(model)
    traces = []
    for length in (20, 24, 28):
        tokens = torch.randint(0, model.args.vocab_size, (2, length))
        model(tokens).sum().backward()
        with torch.no_grad():
            model(tokens)
        traces.append(counter.frame_count)
    assert traces == [3, 6, 6]
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", [[], ["--grad_checkpointing"]], ids=["plain", "checkpointed"])
def test_a_compiled_training_run_gives_the_loss_and_adapter_of_an_eager_one(
    tmp_path, tokenizer_file, backend, checkpointing
):
    """With --grad_checkpointing too: the backward pass runs each compiled block again."""
    model_dir = tiny_model_dir(tmp_path / "model", tokenizer_file)
    # one pair eight times: every micro-batch the same length, so no trace for a new length
    data = write_pairs(tmp_path / "pairs.jsonl", n=1)
    data.write_text(data.read_text() * 8)
    flags = ["--model", model_dir, "--data", data, "--max_steps", 3, "--batch_size", 2]
    flags += checkpointing
    for name, more in (("eager", []), ("compiled", ["--compile"])):
        train.main([str(f) for f in [*flags, "--out", tmp_path / name, *more]])
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("eager", "compiled")
    }
    assert abs(rows["compiled"][0]["loss"] - rows["eager"][0]["loss"]) < 1e-5
    eager, compiled = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=0)
