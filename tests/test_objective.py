"""The Q-Adapter objective and DPO against hand-worked numbers and a slow loop over pairs and tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from qadapter_min.lean_head import loss_from_hidden
from qadapter_min.objective import Objective, loss_from_logits, policy_logits

LN2, LN3 = math.log(2), math.log(3)


def qadapter_loss(q_logits, base_logits, tokens, response_mask, **settings):
    """objective.py's Q-Adapter loss on full logits, at the given settings (the rest the paper's)."""
    return loss_from_logits(q_logits, base_logits, tokens, response_mask, Objective("qadapter", **settings))


def dpo_loss(adapter_logits, reference_logits, tokens, response_mask, beta):
    """objective.py's DPO loss on full logits, the adapter-off model's logits as the reference."""
    return loss_from_logits(adapter_logits, reference_logits, tokens, response_mask, Objective("dpo", dpo_beta=beta))


def test_qadapter_loss_on_a_hand_worked_example():
    """Vocabulary of 3, one pair, alpha = 1, alpha0 = 0.5, beta = 0.1, gamma = 1, uniform pi1
    (base logits all 0, so log pi1 = -ln 3 and V(s) = logsumexp(Q(s, .)) - 0.5 ln 3).

    chosen   tokens [0, 1, 2], reply = tokens 1 and 2, length 3
        s0 (after token 0), action 1: Q = [0, ln2, 0]  -> Q(a) = ln2, V = ln4 - 0.5 ln3
                                        r0 = ln2 - ln4 + 0.5 ln3 = -ln2 + 0.5 ln3
        s1, action 2:                  Q = [0, 0, ln2]  -> r1 = -ln2 + 0.5 ln3 likewise
        R_w = -2 ln2 + ln3
    rejected tokens [0, 2, pad], reply = token 2, length 2
        s0, action 2:                  Q = [0, 0, 0]    -> Q(a) = 0, V = ln3 - 0.5 ln3
                                        r = -0.5 ln3;   R_l = -0.5 ln3
    n = max(3, 2) - 1 = 2
    L_pref = -log sigmoid((R_w - R_l) / 2) = -log sigmoid((1.5 ln3 - 2 ln2) / 2)   ~ 0.62987
    L_chi2 = 0.1 * (r0^2 + r1^2 + r^2) / 3                                         ~ 0.01144
    The logits at the last position of each row, and the rejected row's logits after its reply,
    score nothing: they are set to large values that would show if they leaked in.
    """
    tokens = torch.tensor([[0, 1, 2], [0, 2, 0]])
    response_mask = torch.tensor([[False, True, True], [False, True, False]])
    q_logits = torch.tensor(
        [[[0.0, LN2, 0.0], [0.0, 0.0, LN2], [9.0, -9.0, 7.0]], [[0.0, 0.0, 0.0], [8.0, 5.0, -6.0], [7.0, 7.0, -7.0]]]
    )
    base_logits = torch.zeros(2, 3, 3)
    loss, metrics = qadapter_loss(
        q_logits, base_logits, tokens, response_mask, alpha=1.0, alpha0=0.5, beta=0.1, gamma=1.0
    )

    r_chosen = -LN2 + 0.5 * LN3
    r_rejected = -0.5 * LN3
    pref = math.log1p(math.exp(-(1.5 * LN3 - 2 * LN2) / 2))  # -log sigmoid(x) = log(1 + e^-x)
    chi2 = 0.1 * (2 * r_chosen**2 + r_rejected**2) / 3
    assert metrics["pref_loss"].item() == pytest.approx(pref, rel=1e-6)
    assert metrics["chi2_loss"].item() == pytest.approx(chi2, rel=1e-6)
    assert loss.item() == pytest.approx(pref + chi2, rel=1e-6)
    assert pref == pytest.approx(0.62987, abs=1e-5) and chi2 == pytest.approx(0.011437, abs=1e-6)
    assert metrics["preference_accuracy"].item() == 1.0  # R_w = ln(3/4) > R_l = -0.5 ln3
    assert metrics["preference_margin"].item() == pytest.approx(2 * r_chosen - r_rejected, rel=1e-6)


def test_the_bellman_chi2_term_on_the_same_hand_worked_example():
    """chi2="bellman" squares r'_t = Q(s_t, a_t) - gamma V(s_{t+1}), V = 0 after the reply; the preference
    term is unchanged. The example above:
        chosen   r'0 = Q(s0, 1) - V(s1) = ln2 - (ln4 - 0.5 ln3) = -ln2 + 0.5 ln3;   r'1 = Q(s1, 2) - 0 = ln2
        rejected r'  = Q(s0, 2) - 0 = 0
    L_chi2 = 0.1 * ((0.5 ln3 - ln2)^2 + ln2^2 + 0) / 3   ~ 0.016705
    """
    tokens = torch.tensor([[0, 1, 2], [0, 2, 0]])
    response_mask = torch.tensor([[False, True, True], [False, True, False]])
    q_logits = torch.tensor(
        [[[0.0, LN2, 0.0], [0.0, 0.0, LN2], [9.0, -9.0, 7.0]], [[0.0, 0.0, 0.0], [8.0, 5.0, -6.0], [7.0, 7.0, -7.0]]]
    )
    hyper = dict(alpha=1.0, alpha0=0.5, beta=0.1, gamma=1.0)
    _, authors = qadapter_loss(q_logits, torch.zeros(2, 3, 3), tokens, response_mask, **hyper)
    loss, metrics = qadapter_loss(q_logits, torch.zeros(2, 3, 3), tokens, response_mask, chi2="bellman", **hyper)
    chi2 = 0.1 * ((0.5 * LN3 - LN2) ** 2 + LN2**2) / 3
    assert chi2 == pytest.approx(0.016705, abs=1e-6)
    assert metrics["chi2_loss"].item() == pytest.approx(chi2, rel=1e-6)
    assert metrics["pref_loss"] == authors["pref_loss"] and loss.item() == pytest.approx(
        authors["pref_loss"].item() + chi2, rel=1e-6
    )


def slow_qadapter_loss(q_logits, base_logits, tokens, response_mask, alpha, alpha0, beta, gamma, chi2="authors"):
    """objective.py's equations (1)-(8) (and (7')) literally: a Python loop over pairs and reply tokens."""
    B = tokens.shape[0] // 2
    total = 0.0
    for i in range(B):
        rewards, returns, lengths = [], [], []
        for row in (i, B + i):
            reply = [t for t in range(tokens.shape[1]) if response_mask[row, t]]
            lengths.append(reply[-1] + 1)
            R, Q, V = 0.0, [], []
            for t in reply:  # token t is the action taken in the state after tokens[:t]
                q = q_logits[row, t - 1]
                log_pi1 = torch.log_softmax(base_logits[row, t - 1], dim=0).detach()
                V.append(alpha * torch.logsumexp((q + alpha0 * log_pi1) / alpha, dim=0))
                Q.append(q[tokens[row, t]])
                R = R + Q[-1] - gamma * V[-1]
            returns.append(R)
            if chi2 == "authors":
                rewards += [Q[k] - gamma * V[k] for k in range(len(reply))]
            else:  # the next state's value; none after the last action
                rewards += [Q[k] - gamma * (V[k + 1] if k + 1 < len(reply) else 0.0) for k in range(len(reply))]
        n = max(lengths) - 1
        pref = -F.logsigmoid((returns[0] - returns[1]) / n)
        chi2_term = beta * sum(r**2 for r in rewards) / len(rewards)
        total = total + pref + chi2_term
    return total / B


def random_batch(B=3, T=9, V=7, seed=0):
    """Random logits and pairs with prompts of 1-3 tokens and replies of 1 to T - prompt tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2 * B, T), generator=generator)
    response_mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for row in range(2 * B):
        prompt = int(torch.randint(1, min(4, T), (1,), generator=generator))
        end = int(torch.randint(prompt + 1, T + 1, (1,), generator=generator))
        response_mask[row, prompt:end] = True
    q_logits = torch.randn(2 * B, T, V, generator=generator) * 2
    base_logits = torch.randn(2 * B, T, V, generator=generator) * 2
    return q_logits, base_logits, tokens, response_mask


@pytest.mark.parametrize("chi2", ["authors", "bellman"])
def test_qadapter_loss_and_gradient_match_a_slow_loop_over_pairs_and_tokens(chi2):
    hyper = dict(alpha=0.7, alpha0=0.3, beta=0.2, gamma=0.9, chi2=chi2)
    q_logits, base_logits, tokens, response_mask = random_batch()
    q_fast = q_logits.clone().requires_grad_(True)
    loss, _ = qadapter_loss(q_fast, base_logits, tokens, response_mask, **hyper)
    loss.backward()
    q_slow = q_logits.clone().requires_grad_(True)
    expected = slow_qadapter_loss(q_slow, base_logits, tokens, response_mask, **hyper)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(q_fast.grad, q_slow.grad, rtol=1e-5, atol=1e-7)


def test_the_loss_of_a_batch_is_the_mean_of_its_pairs_and_ignores_padding():
    q_logits, base_logits, tokens, response_mask = random_batch(B=2)
    batch_loss, _ = qadapter_loss(q_logits, base_logits, tokens, response_mask)
    single = []
    for i in (0, 1):
        rows = [i, 2 + i]
        pad = 4  # extra right padding changes nothing
        padded = [F.pad(x[rows], (0, 0, 0, pad)) for x in (q_logits, base_logits)]
        single.append(qadapter_loss(*padded, F.pad(tokens[rows], (0, pad)), F.pad(response_mask[rows], (0, pad)))[0])
    torch.testing.assert_close(batch_loss, (single[0] + single[1]) / 2)


def test_with_gamma_1_the_reward_is_alpha_log_pi_tilde_minus_alpha0_log_pi1():
    """r_t = Q - V = alpha * log pi~(a_t) - alpha0 * log pi1(a_t), with pi~ = softmax(policy_logits)."""
    alpha, alpha0 = 0.8, 0.25
    q_logits, base_logits, tokens, response_mask = random_batch(B=1, T=2)
    response_mask[:] = torch.tensor([False, True])
    _, metrics = qadapter_loss(q_logits, base_logits, tokens, response_mask, alpha=alpha, alpha0=alpha0, beta=0.0)
    a = tokens[:, 1]
    log_pi_tilde = policy_logits(q_logits[:, 0], base_logits[:, 0], alpha, alpha0).log_softmax(-1)
    log_pi1 = base_logits[:, 0].log_softmax(-1)
    r = alpha * log_pi_tilde.gather(1, a[:, None]) - alpha0 * log_pi1.gather(1, a[:, None])  # (2, 1)
    torch.testing.assert_close(metrics["preference_margin"], (r[0] - r[1]).squeeze())


def test_policy_logits_give_pi1_to_the_alpha0_times_exp_q_over_alpha():
    q, base = torch.randn(5, 11), torch.randn(5, 11)
    alpha, alpha0 = 0.5, 0.2
    unnormalised = torch.exp(q / alpha) * torch.softmax(base, -1) ** (alpha0 / alpha)
    expected = unnormalised / unnormalised.sum(-1, keepdim=True)
    torch.testing.assert_close(policy_logits(q, base, alpha, alpha0).softmax(-1), expected)


def test_dpo_loss_on_a_hand_worked_example():
    """Vocabulary of 2, one pair, beta = 0.1. At the state after token 0 the policy logits are
    [0, ln3] (p = 1/4, 3/4) and the reference's are [0, 0] (p = 1/2, 1/2).
    chosen replies token 1: logp_w - ref_w = ln(3/4) - ln(1/2); rejected replies token 0:
    logp_l - ref_l = ln(1/4) - ln(1/2). Margin = 0.1 * ln3; loss = log(1 + 3^-0.1) ~ 0.63972."""
    tokens = torch.tensor([[0, 1], [0, 0]])
    response_mask = torch.tensor([[False, True], [False, True]])
    adapter_logits = torch.tensor([[[0.0, LN3], [4.0, -4.0]], [[0.0, LN3], [-3.0, 3.0]]])
    reference_logits = torch.zeros(2, 2, 2)
    loss, metrics = dpo_loss(adapter_logits, reference_logits, tokens, response_mask, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(3**-0.1), rel=1e-6)
    assert loss.item() == pytest.approx(0.63972, abs=1e-5)
    # the implicit reward is DPO's own over its beta: z_w - z_l = ln3, the chosen reply's the larger
    assert metrics["implicit_reward_margin"].item() == pytest.approx(LN3, rel=1e-6)
    assert metrics["implicit_reward_accuracy"].item() == 1.0


def test_dpo_implicit_reward_accuracy_is_the_share_of_positive_dpo_margins_ties_half():
    """TRL's rewards/accuracies and rewards/margins / beta, from two log-softmaxes by hand, over pairs
    where the policy moved either way and pairs where it equals the reference (a tie: half a pair)."""
    torch.manual_seed(3)
    reference_logits, _, tokens, response_mask = random_batch(B=6, T=7, V=11)
    adapter_logits = reference_logits + 0.7 * torch.randn_like(reference_logits)
    tied = [0, 2]  # pairs whose replies the policy scores as the reference does
    for pair in tied:
        for row in (pair, pair + 6):
            adapter_logits[row] = reference_logits[row]
    _, metrics = dpo_loss(adapter_logits, reference_logits, tokens, response_mask, beta=0.3)

    def reply_log_prob(logits):
        taken = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return (taken * response_mask[:, 1:]).sum(dim=1)  # (2B,)

    reward = 0.3 * (reply_log_prob(adapter_logits) - reply_log_prob(reference_logits))
    margins = reward[:6] - reward[6:]  # DPO's, as dpo_loss forms them
    assert all(margins[pair] == 0 for pair in tied)
    expected = ((margins > 0).sum().item() + 0.5 * len(tied)) / 6
    assert 0 < expected < 1 and expected != 0.5
    assert metrics["implicit_reward_accuracy"].item() == pytest.approx(expected, abs=1e-7)
    assert metrics["implicit_reward_margin"].item() == pytest.approx(margins.mean().item() / 0.3, rel=1e-5)


@pytest.mark.parametrize("name", ["dpo", "qadapter"])
def test_a_policy_equal_to_the_base_model_has_an_implicit_reward_of_exactly_zero(name):
    """Adapter pass and base pass alike (a LoRA whose B is still zero): z = 0 for every reply, so the
    accuracy is 0.5 and the margin 0 exactly, on the chunked path training takes. For Q-Adapter pi~ is
    not pi1 even then (alpha0 < 1 sharpens it), so only DPO's z vanishes."""
    torch.manual_seed(4)
    _, _, tokens, response_mask = random_batch(B=3, T=9, V=13)
    weight, hidden = torch.randn(13, 6), torch.randn(6, 9, 6)
    _, metrics = loss_from_hidden(weight, hidden, hidden, tokens, response_mask, Objective(name))
    if name == "dpo":
        assert metrics["implicit_rewards"].abs().max().item() == 0.0
        assert metrics["implicit_reward_accuracy"].item() == 0.5
        assert metrics["implicit_reward_margin"].item() == 0.0
    else:
        assert metrics["implicit_rewards"].abs().max().item() > 0


@pytest.mark.parametrize("objective", ["qadapter", "qadapter-bellman", "dpo"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_the_chunked_path_from_hidden_states_equals_the_plain_loss_in_value_and_gradients(objective, chunk_size):
    torch.manual_seed(0)
    _, _, tokens, response_mask = random_batch(B=2, T=9, V=13)
    head = torch.nn.Linear(6, 13, bias=False).requires_grad_(False)
    hidden = torch.randn(4, 9, 6, requires_grad=True)
    base_hidden = torch.randn(4, 9, 6)
    if objective.startswith("qadapter"):
        hyper = dict(
            alpha=0.9, alpha0=0.1, beta=0.3, gamma=0.95, chi2="bellman" if objective.endswith("bellman") else "authors"
        )
        plain, _ = qadapter_loss(head(hidden), head(base_hidden), tokens, response_mask, **hyper)
        plain_grad = torch.autograd.grad(plain, hidden)[0]
        lean, _ = loss_from_hidden(
            head.weight, hidden, base_hidden, tokens, response_mask, Objective(**hyper), chunk_size
        )
    else:
        plain, _ = dpo_loss(head(hidden), head(base_hidden), tokens, response_mask, beta=0.1)
        plain_grad = torch.autograd.grad(plain, hidden)[0]
        lean, _ = loss_from_hidden(
            head.weight, hidden, base_hidden, tokens, response_mask, Objective("dpo", dpo_beta=0.1), chunk_size
        )
    lean_grad = torch.autograd.grad(lean, hidden)[0]
    torch.testing.assert_close(lean, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lean_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_the_chunked_path_in_bf16_stays_within_bf16_precision_of_the_plain_loss():
    torch.manual_seed(1)
    _, _, tokens, response_mask = random_batch(B=2, T=9, V=13)
    weight = (torch.randn(13, 6) * 0.5).bfloat16()
    hidden = torch.randn(4, 9, 6).bfloat16().requires_grad_(True)
    base_hidden = torch.randn(4, 9, 6).bfloat16()
    plain, _ = qadapter_loss(hidden @ weight.T, base_hidden @ weight.T, tokens, response_mask, alpha0=0.1)
    plain_grad = torch.autograd.grad(plain, hidden)[0]
    lean, _ = loss_from_hidden(weight, hidden, base_hidden, tokens, response_mask, Objective(alpha0=0.1), chunk_size=4)
    lean_grad = torch.autograd.grad(lean, hidden)[0]
    assert lean_grad.dtype == torch.bfloat16
    torch.testing.assert_close(lean, plain, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(lean_grad.float(), plain_grad.float(), rtol=2e-2, atol=2e-3)
