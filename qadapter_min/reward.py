"""Judging replies with a reward model: a Llama in Hugging Face's LlamaForSequenceClassification layout (the
model.* tensors of a Llama and score.weight, one row), as Skywork-Reward-Llama-3.1-8B and others are published.

The reward of a conversation is score.weight @ h, h the final normed hidden state at its last token, the
conversation encoded in the Llama 3.1 chat format (BOS first, the reply closed by <|eot_id|>).
Win rate of A against B: the share of prompts where A's reply gets the larger reward, ties counting half.
"""

import torch

from qadapter_min.model import Transformer
from qadapter_min.weights import check_score_head, load_model, resolve_model_dir, safetensors_files


def check_reward_model(path_or_repo_id):
    """The reward model's directory, its head checked (one row score.weight) before any model is loaded."""
    model_dir = resolve_model_dir(path_or_repo_id)
    check_score_head(model_dir, safetensors_files(model_dir))
    return model_dir


def load_reward_model(path_or_repo_id, dtype=torch.float32, device="cpu") -> Transformer:
    """The reward model; its head is score.weight, so model(tokens) (B, T, 1) is the reward at each position."""
    return load_model(path_or_repo_id, dtype=dtype, device=device, score_head=True)


@torch.no_grad()
def rewards(model: Transformer, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """The reward of each token sequence, read at its last token; right-padded batches, longest first."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        tokens = torch.zeros(len(batch), len(sequences[batch[0]]), dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            tokens[row, : len(sequences[i])] = torch.tensor(sequences[i], device=device)
        last = torch.tensor([len(sequences[i]) - 1 for i in batch], device=device)
        # (B, C)
        hidden = model(tokens, return_hidden=True)[torch.arange(len(batch), device=device), last]
        values = (hidden.float() @ model.head_weight.float().T)[:, 0]
        for i, value in zip(batch, values.tolist()):
            scores[i] = value
    return scores


def win_rate(scores: list[float], against: list[float]) -> float:
    """The share of prompts where scores beat against, ties counting half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, against)) / len(
        scores
    )
