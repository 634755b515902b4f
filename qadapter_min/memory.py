"""A memory model of one training rank, in GiB: where the bytes go when Q-Adapter trains a Llama.

    weights        every base weight, in the load dtype (the bulk: 15 GiB for 8B in bf16)
    lora_adam      LoRA parameters, their gradients and AdamW's two moments, all fp32 (16 bytes each)
    activations    what autograd keeps for the adapter pass (the base pass runs under no_grad and keeps
                   nothing); with checkpointing, each block's input plus one block recomputed at a time
    objective      one chunk of fp32 (n, V) tensors inside the lean objective (logits of both passes, the
                   base log-softmax, the policy's probabilities), plus the (N, C) gradient directions
The estimate leaves out the CUDA context and allocator slack (about 0.5-1 GiB on a GPU).

Sharded over R ranks (FSDP, one unit per transformer block), a rank holds 1/R of the weights and of
LoRA + AdamW, and a weight in full only while it is in use:
    in_flight      the largest of what is gathered at once: two blocks in the forward and backward passes
                   (the one computing and the next, fetched ahead), the embedding and the first block at
                   the start, and the LM head with the objective's chunk between the passes

Also here: the plan train.py prints before its first step, and the advice it gives when a GPU runs out
of memory all the same.
"""

import os
import sys
from contextlib import contextmanager

import torch

from qadapter_min import UserError
from qadapter_min.common import is_fsdp_model
from qadapter_min.lean_head import CHUNK_SIZE
from qadapter_min.model import ModelArgs

GIB = 1024**3


def training_memory_gib(
    args: ModelArgs,
    trainable_parameters: int,
    micro_batch_size: int,
    max_len: int,
    weight_bytes: int = 2,
    checkpointing: bool = True,
    chunk_size: int = CHUNK_SIZE,
    fsdp_ranks: int | None = None,
) -> dict:
    """Estimated peak bytes per rank, by part, for one micro-batch of pairs of max_len tokens; with
    fsdp_ranks, for the model sharded over that many ranks (module docstring)."""
    total_parameters = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    per_block = (
        args.hidden_size * args.head_dim * (2 * args.num_attention_heads + 2 * args.num_key_value_heads)
        + 3 * args.hidden_size * args.intermediate_size
        + 2 * args.hidden_size
    )
    total_parameters += args.num_hidden_layers * per_block + args.hidden_size
    tokens = 2 * micro_batch_size * max_len  # chosen and rejected
    # Saved for backward inside one block, per token: the two norms' outputs, q, k, v, the attention output,
    # gate, up and silu(gate) * up, and the block input (in the weights' dtype).
    block_activations = (
        5 * args.hidden_size + 2 * args.num_key_value_heads * args.head_dim + 3 * args.intermediate_size
    ) * weight_bytes
    if checkpointing:
        activations = tokens * (args.num_hidden_layers * args.hidden_size * weight_bytes + 2 * block_activations)
    else:
        activations = tokens * args.num_hidden_layers * block_activations
    scored = tokens // 2  # about half of the positions are reply tokens
    objective = min(chunk_size, scored) * args.vocab_size * 4 * 5 + scored * args.hidden_size * weight_bytes
    if fsdp_ranks is None:
        return {
            "weights": total_parameters * weight_bytes / GIB,
            "lora_adam": trainable_parameters * 16 / GIB,
            "activations": activations / GIB,
            "objective": objective / GIB,
        }
    # the embedding, and the LM head (the same when tied)
    matrix = args.vocab_size * args.hidden_size * weight_bytes
    block = per_block * weight_bytes
    return {
        "weights_shard": total_parameters * weight_bytes / fsdp_ranks / GIB,
        "lora_adam_shard": trainable_parameters * 16 / fsdp_ranks / GIB,
        "activations": activations / GIB,
        "in_flight": max(2 * block, matrix + block, matrix + objective) / GIB,
    }


def training_plan(args, model, num_pairs: int, total_steps: int, processes) -> dict:
    """Print what a run of train.py will do and hold in memory (module docstring); returns the
    memory plan, GiB by part."""
    steps_per_epoch = num_pairs // args.batch_size  # the last partial batch of an epoch is left out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    fsdp_ranks = processes.world_size if is_fsdp_model(model) else None
    memory = training_memory_gib(
        model.args,
        trainable,
        args.micro_batch_size,
        args.max_len,
        weight_bytes=dtype.itemsize,
        checkpointing=args.grad_checkpointing,
        fsdp_ranks=fsdp_ranks,
    )
    micro_steps = args.batch_size // processes.world_size // args.micro_batch_size
    planned, available = sum(memory.values()), device_memory_gib(processes.device)
    if processes.master and planned > available:
        print(
            f"warning: the plan holds {planned:.1f} GiB per rank, more than the "
            f"{available:.1f} GiB of {processes.device.type} memory here; lower --micro_batch_size or "
            f"--max_len, add --grad_checkpointing, or shard with --fsdp",
            file=sys.stderr,
            flush=True,
        )
    processes.log(
        f"model: {args.model} ({model.args.num_hidden_layers} layers, width {model.args.hidden_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}) "
        f"on {processes.world_size} x {processes.device.type}\n"
        f"trainable: {trainable:,} LoRA parameters (r {args.lora_r}, alpha {args.lora_alpha}, "
        f"{' '.join(args.lora_targets)})\n"
        f"steps: {total_steps} of {args.batch_size} pairs ({steps_per_epoch} per epoch, "
        f"{num_pairs - steps_per_epoch * args.batch_size} pairs of each epoch's last partial batch "
        f"left out); {micro_steps} micro-steps of {args.micro_batch_size} pairs per rank per step\n"
        f"memory per rank (estimate): "
        + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.items())
        + f", total {sum(memory.values()):.2f} GiB"
    )
    return memory


def device_memory_gib(device: torch.device) -> float:
    """The memory one rank may use: its GPU's, or on a CPU the machine's, shared by the ranks that
    torchrun starts on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / ranks_here


@contextmanager
def out_of_memory_advice(memory: dict, processes):
    """Turn a CUDA out-of-memory error into one sentence: the plan, and the flags that reduce it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in memory.items())
        raise UserError(
            f"rank {processes.rank} ran out of GPU memory on {processes.device}; the plan estimated "
            f"{sum(memory.values()):.1f} GiB per rank ({parts}); add --grad_checkpointing, lower "
            f"--micro_batch_size or --max_len, use --dtype bf16, or shard with --fsdp"
        ) from None
