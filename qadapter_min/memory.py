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
"""

from qadapter_min.model import ModelArgs
from qadapter_min.objective import CHUNK_SIZE

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
        + 3 * args.hidden_size * args.intermediate_size + 2 * args.hidden_size
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
    matrix = args.vocab_size * args.hidden_size * weight_bytes  # the embedding, and the LM head (the same when tied)
    block = per_block * weight_bytes
    return {
        "weights_shard": total_parameters * weight_bytes / fsdp_ranks / GIB,
        "lora_adam_shard": trainable_parameters * 16 / fsdp_ranks / GIB,
        "activations": activations / GIB,
        "in_flight": max(2 * block, matrix + block, matrix + objective) / GIB,
    }
