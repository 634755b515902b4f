"""Llama 3.1 from scratch, in the layout of the Hugging Face checkpoints.

Module names follow the checkpoint's tensor names (without their leading "model."), so a LoRA target
such as "q_proj" is the same word here, in the checkpoint and in a PEFT adapter file.

    tokens (B, T)
      -> embed_tokens                                    (B, T, C)
      -> num_hidden_layers x Block:
             h   = x + attention(rmsnorm(x))             grouped-query attention with RoPE
             out = h + down(silu(gate(rmsnorm(h))) * up(rmsnorm(h)))   SwiGLU MLP
      -> norm -> lm_head                                 (B, T, V)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    """The shape of a Llama model, with the field names of its Hugging Face config.json."""

    hidden_size: int = 4096  # width of the residual stream (C)
    intermediate_size: int = 14336  # hidden width of the SwiGLU MLP
    num_hidden_layers: int = 32  # number of transformer blocks
    num_attention_heads: int = 32  # query heads (H)
    num_key_value_heads: int = 8  # key/value heads; each is shared by H / KV query heads (GQA)
    head_dim: int | None = None  # width of one head; None means hidden_size // num_attention_heads
    vocab_size: int = 128256  # rows of the embedding and of the LM head (V)
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 500000.0  # base of the RoPE frequencies
    rope_scaling: dict | None = None  # llama3 frequency scaling (rope_frequencies); None: plain
    max_position_embeddings: int = 131072  # longest context the model was trained for
    tie_word_embeddings: bool = False  # True: the LM head is the embedding (Llama 3.2 1B/3B)
    bos_token_id: int | None = 128000  # <|begin_of_text|>
    eos_token_id: int | list[int] | None = 128001  # <|end_of_text|>; a list for the Instruct models

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type != "llama3":
                raise ValueError(f"rope_type {rope_type!r} is not supported (only 'llama3' and plain RoPE are)")


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), rotate-half form: the form HF's q/k weights are laid out for.


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies f_i = theta^(-2i/head_dim), i < head_dim/2, with llama3 scaling; fp32.

    llama3 scaling (Llama 3.1 reference, `apply_scaling`): with wavelength w = 2*pi/f,
        w < original / high_freq_factor  -> keep f             (high frequencies: local detail)
        w > original / low_freq_factor   -> f / factor         (low frequencies: stretched context)
        otherwise, with s = (original/w - low) / (high - low), (1-s) * f/factor + s * f.
    """
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    freqs = 1.0 / (args.rope_theta**exponents)  # (head_dim/2,)
    if args.rope_scaling is None:
        return freqs
    factor = args.rope_scaling["factor"]
    low = args.rope_scaling["low_freq_factor"]
    high = args.rope_scaling["high_freq_factor"]
    original = args.rope_scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelength > original / low, freqs / factor, freqs)
    is_medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles position * f, each (T, head_dim) for positions (T,), or
    (B, T, head_dim) for positions (B, T); in fp32."""
    angles = positions.float()[..., None] * freqs  # (..., T, head_dim/2)
    # rotate-half pairs channel i with channel i + head_dim/2, so both halves share one angle
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + head_dim/2) channel pair of x (B, heads, T, head_dim) by its angle."""
    # the tables are fp32; the product is in x's dtype, as in HF
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache:
    """Keys and values of the positions decoded so far, for every layer, in buffers of a fixed size.

    Created by the generation code for one batch, never by the model. `length` is the number of
    positions already stored; the model writes the next ones and then advances it. Every step attends
    over the whole buffer, masked, and `length` is a tensor: a decoding step has the same shapes and
    the same Python values each time, so a compiled step runs again without compiling again.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype, device):
        shape = (batch_size, args.num_key_value_heads, max_seq_len, args.head_dim)
        # a buffer per layer, which a compiled step writes in place (compiled.py says why)
        layers = range(args.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        # (B, max_seq_len) bool: which positions hold a token of the row (False: the left padding
        # of a prompt shorter than the batch's longest), set by the generation code; None: all do.
        self.valid = None

    @property
    def rows(self) -> int:
        """The batch rows held: the customised policy's batch holds each sequence twice."""
        return self.keys[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) at columns (T,); return the whole buffers (B, KV, S, D)."""
        self.keys[layer].index_copy_(2, columns, k)
        self.values[layer].index_copy_(2, columns, v)
        return self.keys[layer], self.values[layer]

    def keep_rows(self, rows: torch.Tensor):
        """Keep only the batch rows listed in rows (a 1-D index tensor), in that order: the others'
        keys, values and padding go, so later steps neither compute nor attend over them."""
        self.keys, self.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        if self.valid is not None:
            self.valid = self.valid[rows]


class Attention(nn.Module):
    """Causal grouped-query attention: KV key/value heads, each shared by H / KV query heads."""

    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        self.layer_index = layer_index  # which slot of a KVCache belongs to this layer
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        # separate q/k/v projections, so LoRA targets map one to one to checkpoint names
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, columns=None) -> torch.Tensor:
        """columns (T,): the cache columns of x's positions, with a kv_cache."""
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:  # the whole sequence at once: the plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # over the whole cache: a query sees the keys at its column and before it
            k, v = kv_cache.update(self.layer_index, k, v, columns)  # (B, KV, S, D)
            keys = torch.arange(k.shape[2], device=x.device)
            mask = keys <= columns[:, None]  # (T, S)
            if kv_cache.valid is not None:  # and no padding key; a padding query sees itself
                mask = (mask & kv_cache.valid[:, None, None, :]) | (keys == columns[:, None])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_index)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, columns=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, columns)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """The Llama causal language model: tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # a tied model has no lm_head tensor: the head is the embedding matrix
        self.lm_head = None
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # per-block activation checkpointing for training: recompute each block in the backward pass
        self.gradient_checkpointing = False

    def forward(
        self,
        tokens: torch.Tensor,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
    ):
        """Logits (B, T, V) for tokens (B, T), or the final normed hidden states (B, T, C).

        With a kv_cache, tokens are the next T columns after the cached ones. With return_hidden,
        the caller applies the LM head itself (`head_weight`), as lean_head.py does at the scored
        positions only. positions (B, T): each row's RoPE positions, for a batch whose rows are
        padded differently (the generation code's); by default every row counts from the cache's
        length.
        """
        B, T = tokens.shape
        columns = torch.arange(T, device=tokens.device)  # (T,): the cache columns written
        if kv_cache is not None:
            columns = columns + kv_cache.length
        if positions is None:
            positions = columns  # (T,): every row's
        # The RoPE tables are recomputed on every call (a few hundred numbers) rather than kept in a
        # buffer: they stay fp32 whatever .to(dtype) does to the module, and need no set-up after a
        # model is built on the meta device.
        freqs = rope_frequencies(self.args, tokens.device)
        cos, sin = rope_cos_sin(freqs, positions)  # (T, D) or (B, T, D)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angles for every head
        x = self.embed_tokens(tokens)  # (B, T, C)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, columns)
        if kv_cache is not None:
            kv_cache.length += T
        hidden = self.norm(x)  # (B, T, C)
        return hidden if return_hidden else self.logits_from_hidden(hidden)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight (V, C): the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the LM head: (..., C) -> (..., V)."""
        return F.linear(hidden, self.head_weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
