"""Decoding with a KV cache, from the base model, the adapter, or Q-Adapter's customised policy.

The customised policy (objective.py, equation (1)) needs two sets of logits at every step:
Q (adapter on) and log pi1 (adapter off), from the same weights. Rather than two forward passes, the
prompt is put in a batch twice, the adapter is switched on for row 0 only, and one forward pass gives
both (weights read once per token):

    row 0: Q(s, .)        row 1: base logits -> log pi1(. | s)
    next token ~ softmax((Q + alpha0 * log pi1) / alpha)  at temperature 1

`policy_mode` says which distribution to sample:
    "base"        the pre-trained model (adapter off)
    "adapter"     the model with the adapter on, alone (a DPO-trained policy)
    "customised"  Q-Adapter's pi~, from the combined batch
"""

import torch

from qadapter_min.lora import adapter_disabled, adapter_on_rows
from qadapter_min.model import KVCache, Transformer
from qadapter_min.objective import policy_logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> int:
    """One token from logits (V,): greedy at temperature 0, else softmax(logits / temperature) after the
    top-k and top-p (nucleus) cuts."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the more likely tokens before it already cover top_p (the first is always kept)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def next_token_logits(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run tokens (rows, T) through the model over its cache; the logits (rows, V) of the last position only.

    The LM head is the largest matrix read per token (V x C). Written as W @ h^T, the product runs as one
    matrix-matrix multiply that streams W once for all rows; F.linear(h, W) with two rows runs as two
    matrix-vector products on some CPU BLAS builds (MKL among them), reading W twice.
    """
    hidden = model(tokens, kv_cache=cache, return_hidden=True)[:, -1]  # (rows, C)
    return (model.head_weight @ hidden.T).T  # (rows, V)


class Decoder:
    """Runs the model one step at a time over a KV cache, giving next-token logits of the chosen policy."""

    def __init__(
        self, model: Transformer, policy_mode: str, alpha: float = 1.0, alpha0: float = 0.01,
        max_seq_len: int = 4096, combined: bool = True,
    ):
        """combined=False computes the customised policy with two caches and two forward passes per
        token (Q, then pi1 with the adapter off): the plain way, kept to check and time the batch."""
        assert policy_mode in ("base", "adapter", "customised")
        self.model, self.policy_mode, self.alpha, self.alpha0 = model, policy_mode, alpha, alpha0
        param = next(model.parameters())
        self.two_passes = policy_mode == "customised" and not combined
        self.rows = 2 if policy_mode == "customised" and combined else 1
        self.cache = KVCache(model.args, self.rows, max_seq_len, param.dtype, param.device)
        self.base_cache = KVCache(model.args, 1, max_seq_len, param.dtype, param.device) if self.two_passes else None
        self.adapter_rows = torch.tensor([True, False], device=param.device)  # row 0 Q, row 1 pi1

    @torch.no_grad()
    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append ids to the sequence (prefill or one step); the policy's logits (V,) for the next token."""
        tokens = torch.tensor([ids] * self.rows, device=self.cache.keys.device)  # (rows, T)
        if self.policy_mode == "base":
            with adapter_disabled(self.model):
                return next_token_logits(self.model, tokens, self.cache)[0].float()
        if self.policy_mode == "adapter":
            return next_token_logits(self.model, tokens, self.cache)[0].float()
        if self.two_passes:
            q = next_token_logits(self.model, tokens, self.cache)[0]
            with adapter_disabled(self.model):
                base = next_token_logits(self.model, tokens, self.base_cache)[0]
            return policy_logits(q, base, self.alpha, self.alpha0)
        with adapter_on_rows(self.model, self.adapter_rows):
            logits = next_token_logits(self.model, tokens, self.cache)  # (2, V): Q, then the base logits
        return policy_logits(logits[0], logits[1], self.alpha, self.alpha0)


def generate(
    model: Transformer,
    prompt_ids: list[int],
    *,
    stop_ids,
    max_new_tokens: int = 256,
    policy_mode: str = "base",
    alpha: float = 1.0,
    alpha0: float = 0.01,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    combined: bool = True,
):
    """Yield the reply's token ids one at a time, stopping at a stop id (not yielded) or max_new_tokens."""
    decoder = Decoder(model, policy_mode, alpha, alpha0, max_seq_len=len(prompt_ids) + max_new_tokens, combined=combined)
    logits = decoder.feed(prompt_ids)  # prefill
    for step in range(max_new_tokens):
        token = sample_token(logits, temperature, top_k, top_p, generator)
        if token in stop_ids:
            return
        yield token
        if step + 1 < max_new_tokens:
            logits = decoder.feed([token])
