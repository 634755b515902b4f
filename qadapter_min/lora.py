"""LoRA (Hu et al., 2021) written out.

In Q-Adapter one set of weights plays two parts (docs/method.md):
    adapter on  -> the residual Q-function Q(s, .)  (the logits of W x + (alpha/r) B A x)
    adapter off -> the pre-trained policy pi1       (the logits of W x alone)
so the base model is the same module inside `adapter_disabled(model)`, with no second copy of W.
Saving adapters in PEFT's layout is adapters.py's, loading them policy.py's.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from qadapter_min import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x), with W frozen and A, B trained.

    `weight` is the base layer's own parameter, so its state-dict key is unchanged
    (layers.0.self_attn.q_proj.weight). A starts kaiming-uniform and B at zero, so a fresh adapter
    leaves the model exactly as it was.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype=torch.float32, device=None):
        super().__init__()
        self.weight = base.weight  # (out, in), frozen
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        device = device or base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's and nn.Linear's init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.disabled = False  # True: behave exactly as the base layer
        self.active_rows = None  # a (B,) bool tensor: apply the adapter to these batch rows only
        self.dropout_keys = None  # a (B,) int64 tensor: row i's dropout mask from keys[i]
        self.index = 0  # this layer's number in the model, set by add_lora: part of its masks' key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.disabled:
            return out
        # The adapter runs in its own (fp32) dtype; the sum goes back to the base's, as in PEFT.
        x = x.to(self.lora_A.weight.dtype)
        if self.training and self.dropout_keys is not None and self.dropout.p > 0:
            x = keyed_dropout(x, self.dropout_keys, self.index, self.dropout.p)
        else:
            x = self.dropout(x)
        update = self.lora_B(self.lora_A(x)) * self.scale
        if self.active_rows is not None:  # (B,) -> (B, 1, ..., 1): rows left out get no update
            update = update * self.active_rows.view(-1, *([1] * (update.dim() - 1)))
        return (out + update).to(out.dtype)


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets=("q_proj", "v_proj"),
    dtype=torch.float32,
    device=None,
) -> nn.Module:
    """Wrap every linear layer named in targets (checkpoint names: q/k/v/o/gate/up/down _proj) in a
    LoRALinear. Afterwards only the LoRA parameters require grad.

    The LoRA weights go on `device` (default: each base weight's own), so a model built on the meta
    device can get real LoRA weights, drawn exactly as on a loaded model (sharding.py)."""
    check_targets(targets)
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, dtype, device))
    if not lora_layers(model):
        raise UserError(f"the model has no layer named {', '.join(targets)} to put LoRA on")
    for index, layer in enumerate(lora_layers(model).values()):
        layer.index = index
    return model


def check_targets(targets):
    """Refuse a LoRA target that is not one of a Llama block's projections."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        choices = ", ".join(PROJECTIONS)
        raise UserError(f"LoRA target {unknown[0]!r} is not a projection of a Llama model; choose from {choices}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: layer}, e.g. {"layers.0.self_attn.q_proj": LoRALinear, ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapter_disabled(model: nn.Module):
    """Inside this block the model is exactly the base model (pi1); the adapter comes back
    afterwards, also when the block raises."""
    layers = list(lora_layers(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


@contextmanager
def adapter_on_rows(model: nn.Module, rows: torch.Tensor):
    """Inside this block the adapter acts on the batch rows where `rows` (B,) is True, and the
    others see the base model: one forward computes Q and pi1 side by side, reading the weights
    once."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.active_rows = rows
    try:
        yield model
    finally:
        for layer in layers:
            layer.active_rows = None


@contextmanager
def keyed_dropout_masks(model: nn.Module, keys: torch.Tensor | None):
    """Inside this block, training-mode LoRA dropout draws the mask of batch row i from keys[i]
    (B,), not from torch's random state (None: nn.Dropout's). The block holds the backward pass
    too: with activation checkpointing it runs the forward again, and must draw the same masks."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.dropout_keys = keys
    try:
        yield model
    finally:
        for layer in layers:
            layer.dropout_keys = None


# ------------------------------------------------------------------------------------------------
# Keyed dropout: a mask that is a pure function of (row key, layer, position, feature), the same on
# every device and whatever else shares the batch, so that how a step's pairs are split over
# processes and micro-batches cannot change the adapter. The mask comes from an integer hash, not a
# random generator.

MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit integers held in int64 (xorshift-multiply rounds); odd multipliers
    below 2^31 keep every product below 2^63, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    return x ^ (x >> 16)


def keyed_dropout(x: torch.Tensor, keys: torch.Tensor, layer_index: int, p: float) -> torch.Tensor:
    """Dropout at rate p of x (B, T, C) that keeps element (b, t, c) where
    hash(keys[b], layer, t, c) >= p 2^32: a position's mask depends neither on the padding after it
    nor on the other rows."""
    B, T, C = x.shape
    assert keys.shape == (B,), f"{B} rows need {B} dropout keys, got {tuple(keys.shape)}"
    row = mix32(keys.to(x.device) ^ layer_index)  # (B,)
    position = mix32(row[:, None] ^ torch.arange(T, device=x.device))  # (B, T)
    features = torch.arange(C, device=x.device)
    uniform32 = mix32(position[:, :, None] ^ features)  # (B, T, C), uniform in [0, 2^32)
    keep = uniform32 >= int(p * 2**32)
    return x * keep / (1 - p)


def dropout_keys(seed: int, step: int, pair_indices: list[int], sides: int = 2) -> torch.Tensor:
    """The keys (2B,) of a micro-batch's rows, chosen rows then rejected ones as data.collate orders
    them (SFT, sides 1: (B,), a row per record): a pure function of (seed, step, pair, side). With
    masks drawn from them, the adapter does not depend on which process or micro-batch a pair is
    in, and a resumed run needs no random state."""
    step_key = mix32(mix32(torch.tensor(seed) & MASK32) ^ step)
    pair_keys = mix32(step_key ^ torch.tensor(pair_indices, dtype=torch.int64))  # (B,)
    return torch.cat([mix32(pair_keys ^ side) for side in range(1, sides + 1)])  # (sides * B,)
