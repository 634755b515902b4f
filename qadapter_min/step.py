"""One micro-batch through the model: the computation that training, evaluation, the built-in
world's report and bench.py all run, so that each measures the same thing.

    tokens (2B, T) --adapter off, no_grad--> base hidden states (pi1)          (2B, T, C) each
                   --adapter on-----------> hidden states (Q, or DPO's policy)
                   --lean_head.loss_from_hidden--> loss, metrics (rewards included)

The base model is the same module with its adapter switched off, so the weights are held once.
"""

import torch

from qadapter_min.common import full
from qadapter_min.lean_head import loss_from_hidden
from qadapter_min.lora import adapter_disabled
from qadapter_min.objective import Objective


def micro_batch_objective(
    model, tokens, response_mask, objective: Objective = Objective(), adapter_forward=None
):
    """(loss, metrics) of one micro-batch: tokens and response_mask (2B, T) as `data.collate` makes
    them (for SFT, (B, T): one conversation per row).

    adapter_forward: what runs the adapter pass (train.py gives its DistributedDataParallel wrapper,
    whose backward all-reduces the LoRA gradients); the model itself by default. Gradients flow only
    through the adapter pass.
    """
    base_hidden = None  # SFT learns the replies alone, without the base model
    if objective.on_pairs:
        with torch.no_grad(), adapter_disabled(model):  # pi1: the same weights, adapter off
            base_hidden = model(tokens, return_hidden=True)
    hidden = (adapter_forward or model)(tokens, return_hidden=True)
    head = full(model.head_weight)  # under --fsdp gathered while the objective needs it, then freed
    return loss_from_hidden(head, hidden, base_hidden, tokens, response_mask, objective)
