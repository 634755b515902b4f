"""One micro-batch of preference pairs through the model: the computation that training, evaluation,
the built-in world's report and bench.py all run, so that each measures the same thing.

    tokens (2B, T) --adapter off, no_grad--> base hidden states (pi1)          (2B, T, C) each
                   --adapter on-----------> hidden states (Q, or DPO's policy)
                   --objective.loss_from_hidden--> loss, metrics (rewards included)

The base model is the same module with its adapter switched off, so the weights are held once.
"""

import torch

from qadapter_min.common import full
from qadapter_min.lora import adapter_disabled, set_dropout_keys
from qadapter_min.objective import loss_from_hidden


def micro_batch_objective(model, tokens, response_mask, settings: dict | None = None, adapter_forward=None,
                          dropout_keys=None):
    """(loss, metrics) of one micro-batch: tokens and response_mask (2B, T) as `data.collate` makes them
    (for SFT, (B, T): one conversation per row).

    settings: `objective.OBJECTIVE_SETTINGS` by name (none: the paper's Q-Adapter).
    adapter_forward: what runs the adapter pass (train.py gives its DistributedDataParallel wrapper, whose
    backward all-reduces the LoRA gradients); the model itself by default.
    dropout_keys (2B,): the key of each row's LoRA dropout masks in training mode (lora.py's keyed_dropout);
    None draws them from torch's random state. Gradients flow only through the adapter pass.
    """
    base_hidden = None  # SFT learns the replies alone, without the base model
    if (settings or {}).get("objective") != "sft":
        with torch.no_grad(), adapter_disabled(model):  # pi1: the same weights with the adapter off
            base_hidden = model(tokens, return_hidden=True)
    set_dropout_keys(model, dropout_keys)
    hidden = (adapter_forward or model)(tokens, return_hidden=True)
    head = full(model.head_weight)  # under --fsdp gathered while the objective needs it, then let go
    return loss_from_hidden(head, hidden, base_hidden, tokens, response_mask, **(settings or {}))
