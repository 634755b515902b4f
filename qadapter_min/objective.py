"""The Q-Adapter objective (Li et al., ICLR 2025) and the DPO baseline, as pure functions.

Conventions shared by every function here:
    tokens         (2B, T)  rows [0, B) are the chosen sequences, rows [B, 2B) their rejected partners
    response_mask  (2B, T)  True where tokens[:, t] belongs to the reply (its closing <|eot_id|> included)
    logits at position t are the model's output after reading tokens[:, :t+1]: the state s_t. The
    action taken in s_t is tokens[:, t+1], so the action a_t is scored where response_mask[:, t+1].

Q-Adapter (Li et al., ICLR 2025; docs/method.md explains it in one page). Q are the logits with the
adapter on, log pi1 the log-softmax of the logits with it off (no gradient). Each line says where it
comes from in the paper:
    pi~(a|s) = softmax_a((Q(s,a) + alpha0 * log pi1(a|s)) / alpha)        (1) the customised policy of
                                                                              residual Q-learning
    V(s)     = alpha * logsumexp_a((Q(s,a) + alpha0 * log pi1(a|s)) / alpha)  (2) its soft value
    r_t      = Q(s_t, a_t) - gamma * V(s_t)                               (3) the new preference's reward,
                                                                              recovered from Q for a fixed pi1
    R(y)     = sum of r_t over the reply's actions                        (4) a reply's return
    n        = max(len(x + y_w), len(x + y_l)) - 1, per pair             (5) the authors' length normaliser
    L_pref   = -log sigmoid((R(y_w) - R(y_l)) / n)                        (6) the Bradley-Terry likelihood
    L_chi2   = beta * mean of r_t^2 over the pair's scored actions,       (7) the authors' chi2 term, a pull
               y_w's and y_l's together                                       of every reward towards 0
    loss     = mean over pairs of L_pref + L_chi2                         (8)

With chi2="bellman" (train.py --chi2 bellman), (7) squares the soft-Bellman residual instead,
    r'_t     = Q(s_t, a_t) - gamma * V(s_{t+1}),  V after the reply's last action = 0      (7')
the reward of residual Q-learning proper; (3)-(6) stay as they are, so only what the chi2 term pulls
towards 0 changes.

With gamma = 1, r_t = alpha * log pi~(a_t|s_t) - alpha0 * log pi1(a_t|s_t) by (1) and (2): the reward
is how much more the customised policy likes the token than the base model does. Summed over a reply
it differs from the Bellman form Q(s_t, a_t) - V(s_{t+1}) only by V(s_T) - V(s_0), where V(s_0) (the
prompt) cancels between y_w and y_l.

Where we differ from the authors' code on purpose:
    - every reply token is scored, the first included (their mask was off by one position);
    - n and the chi2 mean are per pair (theirs per micro-batch; the same at their micro-batch of 1),
      so the loss does not depend on micro-batch size, padding or the number of processes.
"""

import torch
import torch.nn.functional as F

# What defines an objective: the flags of train.py and the keys of qadapter_config.json of the same names.
OBJECTIVE_SETTINGS = ("objective", "alpha", "alpha0", "beta", "gamma", "chi2", "dpo_beta")
CHI2_FORMS = ("authors", "bellman")  # what the chi2 term squares: (3)'s r_t, or (7')'s r'_t
# The policy an adapter trained with each objective defines (generate.py's policy modes).
POLICY_OF_OBJECTIVE = {"qadapter": "customised", "dpo": "adapter", "sft": "adapter"}


def policy_logits(q_logits: torch.Tensor, base_logits: torch.Tensor, alpha: float = 1.0, alpha0: float = 0.01) -> torch.Tensor:
    """Logits of the customised policy pi~, equation (1): (Q + alpha0 * log pi1) / alpha, in fp32."""
    return (q_logits.float() + alpha0 * base_logits.float().log_softmax(dim=-1)) / alpha


def qadapter_token_values(q_logits, base_logits, actions, alpha: float, alpha0: float):
    """Q(s_t, a_t) and V(s_t) for each state, equations (1)-(2).

    q_logits, base_logits: (..., V); actions: (...). Returns two (...) fp32 tensors.
    """
    q = q_logits.float()
    log_pi1 = base_logits.float().log_softmax(dim=-1).detach()  # pi1 is fixed: no gradient
    v = alpha * torch.logsumexp((q + alpha0 * log_pi1) / alpha, dim=-1)  # (2): gradient flows through Q of every token
    q_taken = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return q_taken, v


def dpo_token_values(adapter_logits, reference_logits, actions):
    """log pi(a_t|s_t) of the policy (adapter on) and of the reference (adapter off), each (...), fp32."""
    policy_logp = adapter_logits.float().log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    reference_logp = reference_logits.float().log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return policy_logp, reference_logp.detach()


def _pair_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Length of each sequence without its padding: the reply ends the sequence, so one past the last
    reply token. (2B, T) -> (2B,)"""
    positions = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    return (positions * response_mask).amax(dim=1)


def bellman_residuals(q_taken, v, scored, gamma: float):
    """Equation (7'): r'_t = Q(s_t, a_t) - gamma * V(s_{t+1}), with V = 0 after the reply's last action.
    All (2B, T-1); the reply is one run of scored actions, so s_{t+1} is scored unless a_t ended it."""
    v_next = torch.where(scored[:, 1:], v[:, 1:], 0.0)  # (2B, T-2) V(s_{t+1}) where the reply goes on
    return q_taken - gamma * F.pad(v_next, (0, 1))  # (2B, T-1)


def qadapter_loss_from_token_values(q_taken, v, scored, *, gamma: float, beta: float, chi2: str, lengths):
    """Equations (3)-(8) from Q(s_t, a_t) and V(s_t) (2B, T-1), both with gradient; scored: (2B, T-1) bool,
    True where a_t is a reply token; lengths: (2B,) unpadded sequence lengths. Returns (loss, metrics)."""
    assert chi2 in CHI2_FORMS, chi2
    B = q_taken.shape[0] // 2
    r = torch.where(scored, q_taken - gamma * v, 0.0)  # (3), zero where nothing is scored
    residual = r if chi2 == "authors" else torch.where(scored, bellman_residuals(q_taken, v, scored, gamma), 0.0)  # (7')
    R = r.sum(dim=1)  # (4) (2B,)
    R_chosen, R_rejected = R[:B], R[B:]
    n = torch.maximum(lengths[:B], lengths[B:]).float() - 1  # (5) (B,)
    pref_loss = -F.logsigmoid((R_chosen - R_rejected) / n)  # (6) (B,)
    squares = (residual**2).sum(dim=1)  # (2B,)
    counts = scored.sum(dim=1)  # (2B,)
    chi2_loss = beta * (squares[:B] + squares[B:]) / (counts[:B] + counts[B:]).clamp(min=1)  # (7) (B,)
    loss = (pref_loss + chi2_loss).mean()  # (8)
    metrics = {
        "pref_loss": pref_loss.mean().detach(),
        "chi2_loss": chi2_loss.mean().detach(),
        "accuracy": (R_chosen > R_rejected).float().mean(),
        "margin": (R_chosen - R_rejected).mean().detach(),
        "q_mean": q_taken[scored].mean().detach(),
        "v_mean": v[scored].mean().detach(),
    }
    return loss, metrics


def qadapter_loss(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    alpha: float = 1.0,
    alpha0: float = 0.01,
    beta: float = 0.1,
    gamma: float = 1.0,
    chi2: str = "authors",
):
    """The Q-Adapter loss (module docstring, equations (1)-(8); chi2="bellman": (7')) and its metrics.

    q_logits: (2B, T, V) adapter on; base_logits: (2B, T, V) adapter off; tokens, response_mask: (2B, T).
    Returns (loss, metrics) with metrics pref_loss, chi2_loss, accuracy (R_w > R_l), margin
    (mean R_w - R_l), q_mean and v_mean (over scored actions).
    """
    q_taken, v = qadapter_token_values(q_logits[:, :-1], base_logits[:, :-1], tokens[:, 1:], alpha, alpha0)  # (2B, T-1) each
    return qadapter_loss_from_token_values(q_taken, v, response_mask[:, 1:], gamma=gamma, beta=beta, chi2=chi2,
                                           lengths=_pair_lengths(response_mask))


def dpo_loss_from_token_values(policy_logp, reference_logp, scored, *, beta: float):
    """DPO from per-token log-probs (2B, T-1): -log sigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))."""
    B = policy_logp.shape[0] // 2
    policy = torch.where(scored, policy_logp, 0.0).sum(dim=1)  # (2B,) summed log-probs of each reply
    reference = torch.where(scored, reference_logp, 0.0).sum(dim=1)
    reward = beta * (policy - reference)  # DPO's implicit reward
    margin = reward[:B] - reward[B:]
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "pref_loss": loss.detach(),
        "accuracy": (margin > 0).float().mean(),
        "margin": margin.mean().detach(),
    }
    return loss, metrics


def dpo_loss(
    adapter_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    beta: float = 0.1,
):
    """The DPO baseline (Rafailov et al., 2023), with the adapter-off model as the reference.

    loss = mean over pairs of -log sigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l))), where logp
    is the log-probability of a whole reply (summed over its tokens). Shapes as in qadapter_loss.
    """
    policy_logp, reference_logp = dpo_token_values(adapter_logits[:, :-1], reference_logits[:, :-1], tokens[:, 1:])
    return dpo_loss_from_token_values(policy_logp, reference_logp, response_mask[:, 1:], beta=beta)


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning on the replies (the SFT baseline; with the base model's own replies added to
    the data, the Replay baseline).

    logits: (B, T, V) adapter on; tokens, response_mask: (B, T), one conversation per row.
    loss = mean over records of (mean over the record's reply tokens, its closing <|eot_id|> included, of
    -log pi(a_t|s_t)). Each record weighs the same, however long its reply: a token-level mean over the
    whole batch would weigh long replies more and change with how records are grouped into micro-batches;
    this one does not depend on the micro-batch size, the padding or the number of processes.
    """
    log_pi = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return sft_loss_from_token_values(log_pi, response_mask[:, 1:])


def sft_loss_from_token_values(log_pi: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """The SFT loss from log pi(a_t|s_t) (B, T-1) and which actions are reply tokens (B, T-1)."""
    per_record = torch.where(scored, -log_pi, 0.0).sum(dim=1) / scored.sum(dim=1).clamp(min=1)
    return per_record.mean()


# ----------------------------------------------------------------------------------------------------
# The memory-lean path for training. At Llama 3's vocabulary (128256) the fp32 logits of one 512-token
# pair are 2 x 512 x 128256 x 4 bytes = 0.5 GB for each pass, more than the activations of the whole
# checkpointed 8B model. Instead, the model hands back hidden states (2B, T, C), and the LM head is
# applied only at the scored positions, a chunk of them at a time, inside one autograd Function that
# also computes its own gradient, so no (N, V) tensor outlives its chunk and nothing is recomputed.
#
# Every objective needs, per scored action, the two values of equations (1)-(2),
#     Q(s_t, a_t) = z_t[a_t]      V(s_t) = alpha * logsumexp((z_t + alpha0 * log pi1_t) / alpha),   z_t = W h_t
# (Q-Adapter: r_t = Q(s_t, a_t) - gamma V(s_t), and (7')'s r'_t = Q(s_t, a_t) - gamma V(s_{t+1}); DPO and SFT:
# log pi(a_t|s_t) = Q - V, with alpha 1 and alpha0 0). Their gradients with respect to the logits are
# onehot(a_t) and p_t = softmax((z_t + alpha0 * log pi1_t) / alpha), the customised policy (for DPO and SFT,
# the policy itself): the "one-hot minus softmax" of cross-entropy, in two parts. So the gradient with
# respect to h_t is known in the forward pass up to the scalars dL/dQ_t and dL/dV_t:
#     dL/dh_t = dL/dQ_t * W[a_t] + dL/dV_t * W^T p_t
# The forward pass keeps W^T p_t (N, C); W[a_t] is a row of the head, read again in the backward pass.

CHUNK_SIZE = 256  # scored positions per chunk: five fp32 (256, V) tensors live at once (memory.py counts them)


class ChunkedTokenValues(torch.autograd.Function):
    """Q(s_t, a_t) and V(s_t), and, for the metrics, log pi1(a_t|s_t), from hidden states.

    hidden, base_hidden: (N, C) at the N scored states (adapter on / off; base_hidden None: no base term,
    as for SFT); weight: (V, C) the frozen LM head; actions: (N,). Returns three (N,) fp32 tensors; the
    first two carry a gradient (to hidden).
    """

    @staticmethod
    def forward(ctx, hidden, base_hidden, weight, actions, alpha, alpha0, chunk_size):
        outputs, expected_rows = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            h, a = hidden[start : start + chunk_size], actions[start : start + chunk_size]
            z = (h @ weight.T).float()  # (n, V) Q(s_t, .)
            if base_hidden is None:  # SFT: no base model term (alpha0 0)
                log_pi1 = torch.zeros_like(z[:, :1])
                combined = z / alpha
            else:
                log_pi1 = (base_hidden[start : start + chunk_size] @ weight.T).float().log_softmax(-1)  # (n, V)
                combined = (z + alpha0 * log_pi1) / alpha
            log_normaliser = torch.logsumexp(combined, dim=-1, keepdim=True)  # (n, 1)
            v = alpha * log_normaliser.squeeze(-1)  # V(s_t), equation (2)
            q_taken = z.gather(-1, a[:, None]).squeeze(-1)  # Q(s_t, a_t)
            p = (combined - log_normaliser).exp_()  # p_t, in place: (n, V)
            expected_rows.append(p.to(weight.dtype) @ weight)  # W^T p_t (n, C)
            log_pi1_taken = log_pi1.gather(-1, a[:, None]).squeeze(-1) if base_hidden is not None else torch.zeros_like(v)
            outputs.append(torch.stack([q_taken, v, log_pi1_taken]))
        ctx.save_for_backward(torch.cat(expected_rows), weight, actions)
        ctx.hidden_dtype = hidden.dtype
        q_taken, v, log_pi1_taken = torch.cat(outputs, dim=1)
        ctx.mark_non_differentiable(log_pi1_taken)
        return q_taken, v, log_pi1_taken

    @staticmethod
    def backward(ctx, grad_q, grad_v, unused):
        expected_rows, weight, actions = ctx.saved_tensors
        grad_hidden = grad_q[:, None] * weight[actions].float() + grad_v[:, None] * expected_rows.float()  # (N, C)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None, None


def token_values_from_hidden(weight, hidden, base_hidden, tokens, response_mask, alpha, alpha0, chunk_size=CHUNK_SIZE):
    """ChunkedTokenValues at the scored positions, spread back to (rows, T-1) tensors (zero elsewhere):
    (Q(s_t, a_t), V(s_t), log pi1(a_t|s_t)), scored. base_hidden None: no base-model term (SFT)."""
    assert not weight.requires_grad, "the LM head is frozen: its gradient is not computed"
    scored = response_mask[:, 1:]  # (2B, T-1)
    assert scored.any(), "a batch without a single reply token to score"
    values = ChunkedTokenValues.apply(
        hidden[:, :-1][scored], None if base_hidden is None else base_hidden[:, :-1][scored], weight, tokens[:, 1:][scored],
        alpha, alpha0, chunk_size,
    )  # three (N,) tensors
    spread = [torch.zeros(scored.shape, device=hidden.device).masked_scatter(scored, x) for x in values]
    return spread, scored


def loss_from_hidden(
    head_weight, hidden, base_hidden, tokens, response_mask, *,
    objective="qadapter", alpha=1.0, alpha0=0.01, beta=0.1, gamma=1.0, chi2="authors", dpo_beta=0.1, chunk_size=CHUNK_SIZE,
):
    """qadapter_loss, dpo_loss or sft_loss (by `objective`), with the same value and gradients, from hidden
    states (2B, T, C) (SFT: (B, T, C), base_hidden None) and the LM head's weight (V, C), without (2B, T, V)
    logits.

    The metrics also hold `rewards` (2B,), each reply's implicit reward
        R(y) = sum over its actions of alpha * log pi(a_t|s_t) - alpha0 * log pi1(a_t|s_t)
    for the policy the objective trains: pi~ for Q-Adapter (then R is equation (4) at gamma = 1), the
    adapter-on model for DPO. preference_accuracy is the share of pairs with R(y_w) > R(y_l), and
    preference_margin the mean of R(y_w) - R(y_l): one definition for every policy, so that a Q-Adapter,
    a DPO adapter and the base model compare (the objectives' own `accuracy` and `margin`, of DPO's
    reward or of equation (4) with its gamma, stay internal).
    """
    if objective == "sft":  # rows are single conversations, and there is no base pass
        (q_taken, v, _), scored = token_values_from_hidden(head_weight, hidden, None, tokens, response_mask, 1.0, 0.0, chunk_size)
        return sft_loss_from_token_values(q_taken - v, scored), {}  # log pi(a_t|s_t) = z[a] - logsumexp(z)
    if objective == "qadapter":
        (q_taken, v, log_pi1), scored = token_values_from_hidden(
            head_weight, hidden, base_hidden, tokens, response_mask, alpha, alpha0, chunk_size
        )
        loss, metrics = qadapter_loss_from_token_values(q_taken, v, scored, gamma=gamma, beta=beta, chi2=chi2,
                                                        lengths=_pair_lengths(response_mask))
        log_pi = (q_taken + alpha0 * log_pi1 - v) / alpha  # log pi~(a_t|s_t), by (1) and (2)
    else:
        # with alpha 1 and alpha0 0, Q - V = z[a] - logsumexp(z) = log pi(a_t|s_t)
        (q_taken, v, log_pi1), scored = token_values_from_hidden(
            head_weight, hidden, base_hidden, tokens, response_mask, 1.0, 0.0, chunk_size
        )
        loss, metrics = dpo_loss_from_token_values(q_taken - v, log_pi1, scored, beta=dpo_beta)
        metrics["chi2_loss"] = torch.zeros((), device=loss.device)  # DPO has no such term; logged as 0
        log_pi = q_taken - v
    rewards = torch.where(scored, alpha * log_pi.detach() - alpha0 * log_pi1, 0.0).sum(dim=1)  # (2B,)
    B = rewards.shape[0] // 2
    metrics.update(rewards=rewards, preference_accuracy=(rewards[:B] > rewards[B:]).float().mean(),
                   preference_margin=(rewards[:B] - rewards[B:]).mean())
    return loss, metrics
