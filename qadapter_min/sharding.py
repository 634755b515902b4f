"""Sharding the model over every rank with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard), for models
larger than one GPU: train.py --fsdp.

Each rank keeps 1/R of every weight (a DTensor sharded on dim 0) and gathers a unit's full weights only
while the unit computes. The units: each LoRA matrix on its own (its fp32 weights cannot share one
all-gather with the frozen bf16 base), then each transformer block, then the rest (embedding, final norm,
LM head) at the root. The gradients of the LoRA weights are reduce-scattered, so each rank also keeps
1/R of them and of AdamW's state.

Loading never needs a whole copy on a rank (`load_sharded_model`): the model is built on the meta device
(shapes, no memory), sharded, and only then given memory, each rank its shards; the checkpoint is read one
tensor at a time and each rank copies its own rows of it. Host memory per rank stays near its shard of the
weights plus one tensor, where whole copies would need R times the checkpoint on a node of R ranks.

The few places where a sharded run differs from DDP are here too: how a micro-step skips the
gradient sync (`gradient_sync`) and how evaluation spreads its batches (`evaluation_batches`).

What leaves the ranks is always whole: `full` (common.py) gathers a tensor (a collective: every rank calls it), so
checkpoints and adapters hold full tensors, written by rank 0, and a run can resume on another number of
ranks.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from qadapter_min.common import full, is_fsdp_model, like
from qadapter_min.lora import add_lora, lora_layers
from qadapter_min.reward import add_score_head
from qadapter_min.weights import checkpoint_tensors, empty_model


def shard_model(model: nn.Module) -> nn.Module:
    """Shard the model in place: the LoRA matrices (and a reward model's score head), each block,
    then the root."""
    from torch.distributed.fsdp import fully_shard  # imported on use: most of a second that runs without --fsdp skip

    trained = [m for layer in lora_layers(model).values() for m in (layer.lora_A, layer.lora_B)]
    for module in trained + ([model.score] if hasattr(model, "score") else []):
        fully_shard(module)  # fp32, trained: a unit of its own
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def load_sharded_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, score_head: bool = False, **lora
) -> nn.Module:
    """The checkpoint's model sharded over the ranks with LoRA (add_lora's keyword arguments) on every target,
    the base weights frozen in dtype, the LoRA in fp32 with the very values add_lora draws on a loaded model
    (the same calls on the same device's generator), so a sharded run starts where an unsharded one does."""
    model = empty_model(model_dir).to(dtype)  # meta: no memory yet
    # real LoRA weights: small, and drawn as train.py always draws them
    add_lora(model, device=device, **lora)
    if score_head:
        add_score_head(model, device)
    shard_model(model)
    adapter = {name: p.to_local().clone() for name, p in model.named_parameters() if p.requires_grad}
    # memory for this rank's shards only, the LoRA's included (copied back below)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shard in adapter.items():
            params[name].to_local().copy_(shard)
        for name, whole in checkpoint_tensors(model_dir, model):
            param = params[name]
            # fully_shard splits dim 0 as torch.chunk does, rank i keeping chunk i (none past the last)
            mesh = param.device_mesh
            chunks = whole.chunk(mesh.size(), dim=0)
            rank = mesh.get_local_rank()
            if rank < len(chunks):
                # converted to the run's dtype and device shard by shard
                param.to_local().copy_(chunks[rank])
            del whole, chunks
    return model


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with every state tensor whole (a collective under FSDP)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict):
    """Load a state_dict of whole tensors (full_optimizer_state's), each laid out as its parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        **state,
        "state": {
            i: {k: like(v, params[i]) if v.dim() else v for k, v in s.items()} for i, s in state["state"].items()
        },
    }
    optimizer.load_state_dict(state)


@contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool):
    """A micro-step whose backward reduces the gradients over the ranks (sync) or only accumulates
    them: DDP's no_sync, or FSDP's set_requires_gradient_sync; one process has nothing to sync."""
    if sync or not dist.is_initialized():
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def evaluation_batches(
    pairs: list, size: int, rank: int, world_size: int, model: nn.Module
) -> Iterator[tuple[list, int]]:
    """This rank's micro-batches of the eval pairs, every world_size-th one, each with its weight (its
    number of pairs). Sharded, every rank runs as many micro-batches (a sharded forward pass needs
    every rank), those past the end the first batch again, with weight 0."""
    first, stride = rank * size, world_size * size
    if is_fsdp_model(model):
        rounds = math.ceil(len(pairs) / stride)
    else:
        rounds = len(range(first, len(pairs), stride))
    for i in range(first, first + rounds * stride, stride):
        batch = pairs[i : i + size]
        yield batch or pairs[:size], len(batch)
