"""One micro-batch through the model: the computation that training, evaluation, the built-in
world's report and bench.py all run, so that each measures the same thing.

    tokens (2B, T) --adapter off, no_grad--> base hidden states (pi1)          (2B, T, C) each
                   --adapter on-----------> hidden states (Q, or DPO's policy)
                   --lean_head.loss_from_hidden--> loss, metrics (rewards included)
A reward model (--objective rm) reads its score head at each conversation's last hidden state
instead, the base model unread, for objective.reward_model_loss.

The base model is the same module with its adapter switched off, so the weights are held once.
"""

import torch

from qadapter_min.common import full
from qadapter_min.lean_head import loss_from_hidden
from qadapter_min.lora import adapter_disabled
from qadapter_min.objective import Objective, sequence_lengths
from qadapter_min.reward import reward_model_loss


def micro_batch_objective(model, tokens, response_mask, objective: Objective = Objective(), adapter_forward=None):
    """(loss, metrics) of one micro-batch: tokens and response_mask (2B, T) as `data.collate` makes
    them (for SFT, (B, T): one conversation per row).

    adapter_forward: what runs the adapter pass (train.py gives its DistributedDataParallel wrapper,
    whose backward all-reduces the LoRA gradients); the model itself by default. Gradients flow only
    through the adapter pass.
    """
    if objective.name == "rm":  # a reward model: its score head at each conversation's last token
        hidden = (adapter_forward or model)(tokens, return_hidden=True)
        last = sequence_lengths(response_mask) - 1  # (2B,)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (2B, C)
        return reward_model_loss(model.score(final.float())[:, 0])  # the head is fp32: (2B,)
    base_hidden = None  # SFT learns the replies alone, without the base model
    if objective.on_pairs:  # Q-Adapter and DPO
        with torch.no_grad(), adapter_disabled(model):  # pi1: the same weights, adapter off
            base_hidden = model(tokens, return_hidden=True)
    hidden = (adapter_forward or model)(tokens, return_hidden=True)
    head = full(model.head_weight)  # under --fsdp gathered while the objective needs it, then freed
    return loss_from_hidden(head, hidden, base_hidden, tokens, response_mask, objective)
