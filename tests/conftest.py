"""Shared test helpers: tiny Llama shapes, checkpoints written in the Hugging Face layout, and a tiny
tokenizer trained with Llama 3's pre-tokenizer and special tokens."""

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from qadapter_min.common import run_command_line
from qadapter_min.model import ModelArgs
from toyworld.build import train_llama3_style_tokenizer, write_config

FIXTURES = Path(__file__).parent / "fixtures"


def typed(*argv) -> list[str]:
    """A command line as typed: every flag and value a string (paths and numbers given as they are)."""
    return [str(a) for a in argv]


def run_script(main, *argv) -> subprocess.CompletedProcess:
    """A script's main(argv) run as its command line runs it (run_command_line: a refusal is one line on
    stderr and exit code 2), in this process, which spares each call a second of start-up: the exit code
    and what it printed. Tests of signals and of torchrun start real processes."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            run_command_line(lambda: main([str(a) for a in argv]))
        except SystemExit as exit:
            code = exit.code
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def tiny_args(**overrides) -> ModelArgs:
    """A Llama small enough for CPU tests that still has GQA and llama3 RoPE scaling in all three bands."""
    shape = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        bos_token_id=0,
        eos_token_id=[1, 2],
    )
    shape.update(overrides)
    return ModelArgs(**shape)


def random_hf_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the checkpoint's tensor names (model.layers.0.self_attn.q_proj.weight, ...)."""
    generator = torch.Generator().manual_seed(seed)
    C, F, D = args.hidden_size, args.intermediate_size, args.head_dim
    H, KV = args.num_attention_heads, args.num_key_value_heads

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    state = {"model.embed_tokens.weight": randn(args.vocab_size, C), "model.norm.weight": 1 + randn(C)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "self_attn.q_proj.weight": randn(H * D, C),
                p + "self_attn.k_proj.weight": randn(KV * D, C),
                p + "self_attn.v_proj.weight": randn(KV * D, C),
                p + "self_attn.o_proj.weight": randn(C, H * D),
                p + "mlp.gate_proj.weight": randn(F, C),
                p + "mlp.up_proj.weight": randn(F, C),
                p + "mlp.down_proj.weight": randn(C, F),
                p + "input_layernorm.weight": 1 + randn(C),
                p + "post_attention_layernorm.weight": 1 + randn(C),
            }
        )
    if not args.tie_word_embeddings:
        state["lm_head.weight"] = randn(args.vocab_size, C)
    return state


def write_checkpoint(
    directory: Path, args: ModelArgs, state: dict, shards: int = 1, rope_form: str = "classic"
) -> Path:
    """Write config.json (rope_form "classic" or "parameters") and safetensors in the Hub layout:
    model.safetensors, or shards plus an index."""
    directory.mkdir(parents=True, exist_ok=True)
    write_config(args, directory, rope_form)
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[k::shards]}
        save_file(part, directory / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


CORPUS = [
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "You are a helpful assistant. Please answer briefly.\n\n1. first\n2. second",
    "system user assistant ipython",
    "Numbers like 12345 and 2024, code: def f(x): return x * 2",
] * 20


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small byte-level BPE with Llama 3's pre-tokenizer, decoder and 256 special tokens."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_llama3_style_tokenizer(CORPUS, path, vocab_size=600)
    return path


def tiny_model_dir(directory: Path, tokenizer_file: Path, seed: int = 0) -> Path:
    """A random tiny Llama with a trained Llama-3-style tokenizer: a complete model directory."""
    vocab_size = HFTokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    # a context of 1024 tokens: train.py's default --max_len (512) must fit in it
    args = tiny_args(vocab_size=vocab_size, max_position_embeddings=1024)
    write_checkpoint(directory, args, random_hf_state(args, seed=seed))
    (directory / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return directory


def tiny_chatml_model_dir(directory: Path, seed: int = 0) -> Path:
    """A random tiny Llama with the tiny ChatML tokenizer and SmolLM2's chat template (fixtures/tiny-chatml)."""
    source = FIXTURES / "tiny-chatml"
    vocab_size = HFTokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    args = tiny_args(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling=None,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    write_checkpoint(directory, args, random_hf_state(args, seed=seed))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((source / name).read_bytes())
    return directory


def write_pairs(path: Path, n: int = 8) -> Path:
    """n conversational preference pairs in JSON Lines."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = [{"role": "user", "content": f"What is {i} plus {i}?"}]
            f.write(
                json.dumps(
                    {
                        "chosen": prompt + [{"role": "assistant", "content": f"Sure! {i} plus {i} is {2 * i}."}],
                        "rejected": prompt + [{"role": "assistant", "content": f"{2 * i}"}],
                    }
                )
                + "\n"
            )
    return path
