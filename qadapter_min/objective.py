"""The Q-Adapter objective (Li et al., ICLR 2025) and its baselines DPO and SFT, as pure functions.

Conventions shared by every function here:
    tokens         (2B, T)  rows [0, B) are the chosen sequences, rows [B, 2B) their rejected pairs
    response_mask  (2B, T)  True where tokens[:, t] is a reply token (its closing <|eot_id|> too)
    the logits at position t are the model's output after reading tokens[:, :t+1]: the state s_t.
    The action taken in s_t is tokens[:, t+1], so a_t is scored where response_mask[:, t+1].

Q-Adapter (docs/method.md explains it in one page). Q are the logits with the adapter on, log pi1
the log-softmax of the logits with it off (no gradient). Each line names its equation in the paper:
    pi~(a|s) = softmax_a((Q(s,a) + alpha0 * log pi1(a|s)) / alpha)         (1) customised policy
    V(s)     = alpha * logsumexp_a((Q(s,a) + alpha0 * log pi1(a|s)) / alpha)  (2) its soft value
    r_t      = Q(s_t, a_t) - gamma * V(s_t)        (3) the new preference's reward, for a fixed pi1
    R(y)     = sum of r_t over the reply's actions                            (4) a reply's return
    n        = max(len(x + y_w), len(x + y_l)) - 1, per pair             (5) the authors' normaliser
    L_pref   = -log sigmoid((R(y_w) - R(y_l)) / n)                      (6) Bradley-Terry likelihood
    L_chi2   = beta * mean of r_t^2 over the pair's scored actions   (7) the authors' chi2 term, a
               (y_w's and y_l's together)                                pull of every reward to 0
    loss     = mean over pairs of L_pref + L_chi2                                              (8)
With chi2="bellman", (7) squares the soft-Bellman residual of residual Q-learning instead,
    r'_t     = Q(s_t, a_t) - gamma * V(s_{t+1}),  V after the reply's last action = 0         (7')
and (3)-(6) stay as they are. With gamma = 1, by (1) and (2), r_t = alpha log pi~(a_t|s_t) -
alpha0 log pi1(a_t|s_t): how much more the customised policy likes the token than the base does.

Each objective needs Q(s_t, a_t), V(s_t), log pi1(a_t|s_t) per scored action (DPO and SFT read log
pi = Q - V at alpha 1, alpha0 0): `token_values` from full logits, lean_head.py from hidden states.

Where we differ from the authors' code on purpose:
    - every reply token is scored, the first included (their mask was off by one position);
    - n and the chi2 mean are per pair (theirs per micro-batch; the same at their micro-batch of 1),
      so the loss depends on neither micro-batch size, padding nor the number of processes.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHI2_FORMS = ("authors", "bellman")  # what the chi2 term squares: (3)'s r_t, or (7')'s r'_t
# how the policy trained scores each pair, by R and by z (Objective.loss); then all a step logs
PAIR_METRICS = ("preference_accuracy", "preference_margin")
PAIR_METRICS += ("implicit_reward_accuracy", "implicit_reward_margin")
METRIC_NAMES = ("loss", "pref_loss", "chi2_loss", *PAIR_METRICS)
REWARD_MODEL_METRICS = ("loss", "reward_accuracy", "reward_margin")  # reward.py's


@dataclass(frozen=True)
class Objective:
    """What a run optimises: train.py's flags of these names, and qadapter_config.json's keys."""

    name: str = "qadapter"  # "qadapter", a baseline "dpo", "sft", or "rm" (the key "objective")
    alpha: float = 1.0  # (1): temperature of the customised policy
    alpha0: float = 0.01  # (1): weight of the base model's log-probabilities (the paper's lambda)
    beta: float = 0.1  # (7): weight of the chi2 term
    gamma: float = 1.0  # (3): discount
    chi2: str = "authors"  # what (7) squares, one of CHI2_FORMS
    dpo_beta: float = 0.1  # DPO: inverse temperature of its implicit reward

    @classmethod
    def read(cls, values: dict) -> "Objective":
        """From qadapter_config.json's keys or train.py's flags; a missing key keeps its default."""
        names = [field.name for field in dataclasses.fields(cls)][1:]
        return cls(values.get("objective", cls.name), **{k: values[k] for k in names if k in values})

    def config(self) -> dict:
        """The keys qadapter_config.json records, in this order."""
        values = dataclasses.asdict(self)
        return {"objective": values.pop("name"), **values}

    @property
    def on_pairs(self) -> bool:
        """Q-Adapter, DPO and a reward model learn from pairs; SFT from replies alone."""
        return self.name != "sft"

    @property
    def policy_mode(self) -> str:
        """The policy the adapter defines (generate.py): pi~ for Q-Adapter, else the adapter on."""
        return "customised" if self.name == "qadapter" else "adapter"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What a training step logs (SFT: its loss alone)."""
        dpo = tuple(name for name in METRIC_NAMES if name != "chi2_loss")  # DPO has no chi2 term
        names = {"qadapter": METRIC_NAMES, "dpo": dpo, "rm": REWARD_MODEL_METRICS}
        return names.get(self.name, METRIC_NAMES[:1])

    @property
    def temperatures(self) -> tuple[float, float]:
        """(alpha, alpha0) of the values Q and V are read at: (1, 0) gives Q - V = log pi."""
        return (self.alpha, self.alpha0) if self.name == "qadapter" else (1.0, 0.0)

    def loss(self, q_taken, v, log_pi1, scored, lengths):
        """(loss, metrics) from Q(s_t, a_t), V(s_t) (2B, T-1), both with gradient, log pi1(a_t|s_t)
        and scored (2B, T-1), True where a_t is a reply token; lengths (2B,): unpadded lengths.

        The metrics score each reply under the policy trained, pi (pi~ for Q-Adapter, DPO's adapter
        on), summed over its actions: `rewards` R = alpha log pi - alpha0 log pi1 ((4) at gamma 1),
        and `implicit_rewards` z = log pi - log pi1, learning measured from the base model as TRL
        measures DPO's (its reward over beta); each with the share of pairs whose chosen reply
        scores higher (_accuracy; for z ties count half: the base's 0.5) and the mean."""
        if not self.on_pairs:  # rows are single conversations, without the base model
            return sft_loss(q_taken - v, scored), {}
        if self.name == "qadapter":
            loss, metrics = qadapter_loss(q_taken, v, scored, lengths, self)
            log_pi = (q_taken + self.alpha0 * log_pi1 - v) / self.alpha  # log pi~, by (1) and (2)
        else:
            loss, metrics = dpo_loss(q_taken - v, log_pi1, scored, self.dpo_beta)
            log_pi = q_taken - v
        alpha, alpha0 = self.temperatures  # DPO: (1, 0)
        log_pi = log_pi.detach()
        R = torch.where(scored, alpha * log_pi - alpha0 * log_pi1, 0.0).sum(dim=1)  # (2B,)
        z = torch.where(scored, log_pi - log_pi1, 0.0).sum(dim=1)  # (2B,)
        (R_w, R_l), (z_w, z_l) = R.chunk(2), z.chunk(2)
        metrics.update(rewards=R, implicit_rewards=z, preference_margin=(R_w - R_l).mean())
        metrics.update(preference_accuracy=(R_w > R_l).float().mean())
        metrics.update(implicit_reward_accuracy=((z_w > z_l) + 0.5 * (z_w == z_l)).mean())
        metrics.update(implicit_reward_margin=(z_w - z_l).mean())
        return loss, metrics


def policy_logits(q_logits, base_logits, alpha: float, alpha0: float) -> torch.Tensor:
    """Logits of the customised policy pi~, equation (1): (Q + alpha0 log pi1) / alpha, in fp32."""
    return (q_logits.float() + alpha0 * base_logits.float().log_softmax(dim=-1)) / alpha


def qadapter_loss(q_taken, v, scored, lengths, objective: Objective):
    """Equations (3)-(8) (chi2 "bellman": (7')), shapes as in Objective.loss; (loss, metrics)."""
    assert objective.chi2 in CHI2_FORMS, objective.chi2
    gamma, B = objective.gamma, q_taken.shape[0] // 2
    r = torch.where(scored, q_taken - gamma * v, 0.0)  # (3), zero where nothing is scored
    if objective.chi2 == "authors":
        residual = r
    else:  # (7'): V(s_{t+1}) where the reply goes on (a reply is one run of scored actions), else 0
        v_next = F.pad(torch.where(scored[:, 1:], v[:, 1:], 0.0), (0, 1))  # (2B, T-1)
        residual = torch.where(scored, q_taken - gamma * v_next, 0.0)
    R = r.sum(dim=1)  # (4) (2B,)
    R_chosen, R_rejected = R[:B], R[B:]
    n = torch.maximum(lengths[:B], lengths[B:]).float() - 1  # (5) (B,)
    pref_loss = -F.logsigmoid((R_chosen - R_rejected) / n)  # (6) (B,)
    squares, counts = (residual**2).sum(dim=1), scored.sum(dim=1)  # (2B,) each
    pair_counts = (counts[:B] + counts[B:]).clamp(min=1)  # (B,)
    chi2_loss = objective.beta * (squares[:B] + squares[B:]) / pair_counts  # (7) (B,)
    loss = (pref_loss + chi2_loss).mean()  # (8)
    metrics = {
        "pref_loss": pref_loss.mean().detach(),
        "chi2_loss": chi2_loss.mean().detach(),  # (7), (B,) before the mean
    }
    return loss, metrics


def dpo_loss(log_pi, reference_log_pi, scored, beta: float):
    """DPO (Rafailov et al., 2023), the adapter-off model as its reference: the mean over pairs of
    -log sigmoid(beta * ((log pi(y_w) - ref(y_w)) - (log pi(y_l) - ref(y_l)))), where log pi(y) sums
    the reply's log pi(a_t|s_t) (2B, T-1). (loss, metrics)."""
    B = log_pi.shape[0] // 2
    # (2B,) DPO's implicit reward, beta (log pi(y) - ref(y)) (Objective.loss: z = it over beta)
    reward = beta * torch.where(scored, log_pi - reference_log_pi, 0.0).sum(dim=1)
    loss = -F.logsigmoid(reward[:B] - reward[B:]).mean()
    return loss, {"pref_loss": loss.detach()}


def sft_loss(log_pi, scored) -> torch.Tensor:
    """Supervised fine-tuning on the replies (with the base model's own replies added to the data,
    the Replay baseline): the mean over records of each reply's mean -log pi(a_t|s_t) (B, T-1), its
    closing <|eot_id|> included. Each record weighs the same, however long: a mean over the batch's
    tokens would weigh long replies more, and change with how records share micro-batches."""
    per_record = torch.where(scored, -log_pi, 0.0).sum(dim=1) / scored.sum(dim=1).clamp(min=1)
    return per_record.mean()


def sequence_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """(2B, T) -> (2B,): each sequence's length without padding, the reply being its end."""
    positions = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    return (positions * response_mask).amax(dim=1)


def token_values(logits, base_logits, tokens, objective: Objective):
    """Q(s_t, a_t), V(s_t) and log pi1(a_t|s_t) (2B, T-1) from full logits (2B, T, V), equations
    (1)-(2) read at the objective's temperatures; base_logits None: no base model (SFT)."""
    alpha, alpha0 = objective.temperatures
    q, actions = logits[:, :-1].float(), tokens[:, 1:, None]
    base = torch.zeros_like(q) if base_logits is None else base_logits[:, :-1].float().detach()
    log_pi1 = base.log_softmax(dim=-1)  # pi1 is fixed (SFT has none: alpha0 0 leaves it out)
    v = alpha * torch.logsumexp((q + alpha0 * log_pi1) / alpha, dim=-1)  # (2): through every Q
    return q.gather(-1, actions).squeeze(-1), v, taken_log_prob(base, actions)


def taken_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[a], (..., V), (..., 1) -> (...), computed as log pi = Q - V is (a policy
    equal to the base model then has z = 0 exactly; log_softmax rounds otherwise)."""
    return logits.gather(-1, actions).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def loss_from_logits(logits, base_logits, tokens, response_mask, objective=Objective()):
    """The objective's (loss, metrics) from full logits: the plain form of lean_head.py's path."""
    values = token_values(logits, base_logits, tokens, objective)
    return objective.loss(*values, response_mask[:, 1:], sequence_lengths(response_mask))
