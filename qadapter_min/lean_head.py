"""The LM head and the objective without full logits: how training affords Llama 3's vocabulary.

At a vocabulary of 128256 the fp32 logits of one 512-token pair are 2 x 512 x 128256 x 4 bytes =
0.5 GB per pass, more than the activations of the whole checkpointed 8B model. So the model hands
back hidden states (2B, T, C) and the head W (V, C) is applied only at the N scored positions, a
chunk at a time, inside one autograd Function that forms its own gradient in the forward pass: no
(N, V) tensor outlives its chunk, and nothing is recomputed. In and out:

    hidden states h_t (adapter on), base hidden states (adapter off), the frozen head W
      -> Q(s_t, a_t) = z_t[a_t],  V(s_t) = alpha * logsumexp((z_t + alpha0 * log pi1_t) / alpha),
         log pi1(a_t|s_t) = log_softmax(W h_t^base)[a_t],           with z_t = W h_t     (N,) each

objective.py's equations (1)-(2). The gradients of Q and V with respect to the logits are onehot(a_t)
and p_t = softmax((z_t + alpha0 * log pi1_t) / alpha), the policy the values are read at: the
"one-hot minus softmax" of cross-entropy, in two parts. So the gradient with respect to h_t is known
in the forward pass up to the scalars dL/dQ_t and dL/dV_t that the objective sends back:
    dL/dh_t = dL/dQ_t * W[a_t] + dL/dV_t * W^T p_t
The forward pass keeps W^T p_t (N, C); W[a_t] is a row of the head, read again in the backward pass.
This is the fused linear cross-entropy of Liger Kernel (Hsu et al., 2024), made to carry Q and V
apart so that every objective of objective.py can be built on them. tests/test_objective.py checks
the loss and the gradients equal objective.loss_from_logits's on full logits, in fp32 and bf16.
"""

import torch

from qadapter_min.objective import Objective, sequence_lengths, taken_log_prob

CHUNK_SIZE = 256  # scored positions per chunk: five fp32 (256, V) tensors live at once (memory.py)


class ChunkedTokenValues(torch.autograd.Function):
    """Q(s_t, a_t), V(s_t) and log pi1(a_t|s_t) from hidden states (module docstring).

    hidden, base_hidden: (N, C) at the N scored states (adapter on / off; base_hidden None: no base
    model, as for SFT); weight: (V, C) the frozen LM head; actions: (N,). Returns three (N,) fp32
    tensors; the first two carry a gradient (to hidden).
    """

    @staticmethod
    def forward(ctx, hidden, base_hidden, weight, actions, alpha, alpha0, chunk_size):
        outputs, expected_rows = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            h, a = hidden[start : start + chunk_size], actions[start : start + chunk_size, None]
            z = (h @ weight.T).float()  # (n, V) Q(s_t, .)
            log_pi1_taken = torch.zeros_like(z[:, 0])
            if base_hidden is None:  # SFT: no base model term (alpha0 0)
                combined = z / alpha
            else:
                base_z = (base_hidden[start : start + chunk_size] @ weight.T).float()  # (n, V)
                log_pi1_taken = taken_log_prob(base_z, a)
                combined = (z + alpha0 * base_z.log_softmax(-1)) / alpha  # (n, V)
                del base_z
            log_normaliser = torch.logsumexp(combined, dim=-1, keepdim=True)  # (n, 1)
            v = alpha * log_normaliser.squeeze(-1)  # V(s_t), equation (2)
            q_taken = z.gather(-1, a).squeeze(-1)  # Q(s_t, a_t)
            p = (combined - log_normaliser).exp_()  # p_t, in place: (n, V)
            expected_rows.append(p.to(weight.dtype) @ weight)  # W^T p_t (n, C)
            outputs.append(torch.stack([q_taken, v, log_pi1_taken]))
        ctx.save_for_backward(torch.cat(expected_rows), weight, actions)
        ctx.hidden_dtype = hidden.dtype
        q_taken, v, log_pi1_taken = torch.cat(outputs, dim=1)
        ctx.mark_non_differentiable(log_pi1_taken)
        return q_taken, v, log_pi1_taken

    @staticmethod
    def backward(ctx, grad_q, grad_v, unused):
        expected_rows, weight, actions = ctx.saved_tensors
        grad_q_rows = grad_q[:, None] * weight[actions].float()  # dL/dQ_t * W[a_t]
        grad_hidden = grad_q_rows + grad_v[:, None] * expected_rows.float()  # (N, C)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None, None


def token_values_from_hidden(weight, hidden, base_hidden, tokens, response_mask, objective, chunk_size=CHUNK_SIZE):
    """ChunkedTokenValues at the scored positions at the objective's temperatures, spread back to
    (rows, T-1) tensors, zero elsewhere: ([Q(s_t, a_t), V(s_t), log pi1(a_t|s_t)], scored)."""
    assert not weight.requires_grad, "the LM head is frozen: its gradient is not computed"
    scored = response_mask[:, 1:]  # (2B, T-1)
    assert scored.any(), "a batch without a single reply token to score"
    base_scored = None if base_hidden is None else base_hidden[:, :-1][scored]
    actions = tokens[:, 1:][scored]
    # three (N,) tensors
    values = ChunkedTokenValues.apply(
        hidden[:, :-1][scored], base_scored, weight, actions, *objective.temperatures, chunk_size
    )
    zeros = torch.zeros(scored.shape, device=hidden.device)
    return [zeros.masked_scatter(scored, x) for x in values], scored


def loss_from_hidden(
    head_weight,
    hidden,
    base_hidden,
    tokens,
    response_mask,
    objective: Objective = Objective(),
    chunk_size: int = CHUNK_SIZE,
):
    """objective.loss_from_logits, with the same value and gradients, from hidden states (2B, T, C)
    (SFT: (B, T, C), base_hidden None) and the LM head's weight (V, C), without (2B, T, V) logits."""
    values, scored = token_values_from_hidden(
        head_weight, hidden, base_hidden, tokens, response_mask, objective, chunk_size
    )
    return objective.loss(*values, scored, sequence_lengths(response_mask))
