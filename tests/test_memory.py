"""The memory model behind train.py's plan and bench.py --plan, against numbers worked by hand."""

import pytest

import bench
from bench import PRESETS
from qadapter_min.memory import GIB, training_memory_gib
from qadapter_min.model import ModelArgs

# C 4, F 8, 2 layers, 2 query heads and 1 key/value head of 2 dims, 10 words, untied head
TINY = ModelArgs(
    hidden_size=4,
    intermediate_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=2,
    vocab_size=10,
    tie_word_embeddings=False,
)


def test_sharding_divides_the_weights_and_the_optimizer_and_holds_the_largest_gathered_set():
    ddp = training_memory_gib(TINY, 100, micro_batch_size=1, max_len=3, weight_bytes=2)
    fsdp = training_memory_gib(TINY, 100, micro_batch_size=1, max_len=3, weight_bytes=2, fsdp_ranks=4)
    # a block: q, k, v, o 4*2*(2*2 + 2*1) = 48, gate, up, down 3*4*8 = 96, two norms 8: 152 parameters;
    # the model: embedding 40 + head 40 + 2 blocks 304 + final norm 4 = 388 parameters, 776 bytes
    assert ddp["weights"] * GIB == pytest.approx(776) and fsdp["weights_shard"] * GIB == pytest.approx(776 / 4)
    assert fsdp["lora_adam_shard"] * GIB == pytest.approx(100 * 16 / 4) and fsdp["activations"] == ddp["activations"]
    # 6 tokens, 3 scored: the objective's chunk 3 * 10 * 4 bytes * 5 tensors + 3 * 4 * 2 = 624 bytes; in flight the
    # largest of two blocks (608), the embedding and a block (80 + 304), the head and the objective (80 + 624)
    assert ddp["objective"] * GIB == pytest.approx(624) and fsdp["in_flight"] * GIB == pytest.approx(704)


def test_the_plans_the_issue_sizes_for():
    def per_rank(name, ranks):
        args = PRESETS[name]
        lora = (
            args.num_hidden_layers
            * 8
            * (2 * args.hidden_size + (args.num_attention_heads + args.num_key_value_heads) * args.head_dim)
        )
        return sum(training_memory_gib(args, lora, 1, 512, fsdp_ranks=ranks).values())

    assert per_rank("llama-3.1-70b", 8) <= 22  # two nodes of 4x4090
    assert per_rank("llama-3.1-8b", 4) < 11  # four 12 GB cards


def test_bench_plan_prints_ddp_and_fsdp_for_each_large_preset(capsys):
    bench.memory_plans()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["DDP", "FSDP", "x4", "FSDP", "x8", "FSDP", "x16"]
    assert [line.split()[0] for line in lines[2:]] == ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"]
    assert float(lines[2].split()[1]) == pytest.approx(16.1, abs=0.05)  # the 8B plan train.py prints, under DDP
