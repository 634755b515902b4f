"""Sharding the model over every rank with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard), for models
larger than one GPU: train.py --fsdp.

Each rank keeps 1/R of every weight (a DTensor sharded on dim 0) and gathers a unit's full weights only
while the unit computes. The units: each LoRA matrix on its own (its fp32 weights cannot share one
all-gather with the frozen bf16 base), then each transformer block, then the rest (embedding, final norm,
LM head) at the root. The gradients of the LoRA weights are reduce-scattered, so each rank also keeps
1/R of them and of AdamW's state.

What leaves the ranks is always whole: `full` (common.py) gathers a tensor (a collective: every rank calls it), so
checkpoints and adapters hold full tensors, written by rank 0, and a run can resume on another number of
ranks.
"""

import torch
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

from qadapter_min.common import full, like
from qadapter_min.lora import lora_layers


def shard_model(model: nn.Module) -> nn.Module:
    """Shard the model in place: the LoRA matrices, each block, then the root."""
    for layer in lora_layers(model).values():
        fully_shard(layer.lora_A)
        fully_shard(layer.lora_B)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with every state tensor whole (a collective under FSDP)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict):
    """Load a state_dict of whole tensors (full_optimizer_state's), each laid out as its parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {**state, "state": {i: {k: like(v, params[i]) if v.dim() else v for k, v in s.items()}
                                for i, s in state["state"].items()}}
    optimizer.load_state_dict(state)
