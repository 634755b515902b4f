"""The policies a model can be measured as, and what every measurement asks of one.

A base model with an adapter on it defines a policy by the objective the adapter was trained with:
    Q-Adapter (qadapter_config.json objective "qadapter") -> pi~ = softmax((Q + alpha0 log pi1) / alpha)
    DPO                                                    -> the adapter-on model, softmax(logits)
    no adapter                                             -> the base model pi1
(the "customised", "adapter" and "base" modes of generate.py), read back from what train.py wrote
(load_adapter, load_run_config: adapters.py writes them). The measurements:

    log_probs            log pi(a_t | s_t) of given tokens, for lm-eval's log-likelihoods
    preference_metrics   how the policy scores held-out pairs, by R and by z
    reply_nll            its mean negative log-likelihood per reply token of given conversations

R(y) = sum over the reply of alpha log pi(a_t|s_t) - alpha0 log pi1(a_t|s_t), the reward that
objective.Objective.loss defines; for the base model (and a DPO or SFT adapter) alpha = 1 and
alpha0 = 0, so R is its log-likelihood of the reply. Preference accuracy is the share of pairs with
R(chosen) > R(rejected); preference margin the mean of R(chosen) - R(rejected).
z(y) = sum over the reply of log pi(a_t|s_t) - log pi1(a_t|s_t), the implicit reward: what the policy
learned relative to the base model (0 for the base model itself). Implicit reward accuracy is the share
of pairs with z(chosen) > z(rejected), ties counting half; implicit reward margin the mean difference.
"""

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from qadapter_min import UserError
from qadapter_min.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG, peft_tensor_name
from qadapter_min.common import Progress, read_json_file
from qadapter_min.data import EncodedConversation, collate
from qadapter_min.lean_head import CHUNK_SIZE
from qadapter_min.lora import adapter_disabled, adapter_on_rows, add_lora, lora_layers
from qadapter_min.objective import PAIR_METRICS, Objective, policy_logits
from qadapter_min.step import micro_batch_objective
from qadapter_min.weights import model_fingerprint


@dataclass(frozen=True)
class Policy:
    """A distribution to decode or score: the base model, or an adapter under the policy it was trained for."""

    name: str  # "base", or the adapter's path as given
    mode: str = "base"  # generate.py's policy modes: "base", "adapter", "customised"
    adapter: str | None = None
    alpha: float = 1.0
    alpha0: float = 0.0
    objective: Objective | None = None  # what the adapter was trained with (None: no adapter)
    base_model: str | None = None  # the base model the adapter was trained on, as train.py was given it
    fingerprint: str | None = None  # and a fingerprint of it (weights.model_fingerprint)
    scale: float = 1.0  # the adapter's update scaled: W + scale (alpha/r) B A (0: the base weights)


BASE = Policy("base")


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = read_json_file(
        path, "pass a directory written by train.py or by peft's save_pretrained", "save the adapter again"
    )
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path} describes a {config.get('peft_type')!r} adapter; qadapter-min loads LoRA adapters")
    return config


def load_adapter(model: nn.Module, adapter_dir, dtype=torch.float32) -> dict:
    """Put a saved adapter (PEFT layout) on the model, adding LoRA layers if it has none. Returns the config."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    if not lora_layers(model):
        add_lora(
            model,
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            targets=tuple(targets),
            dtype=dtype,
        )
    layers = lora_layers(model)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a directory written by train.py or by peft's save_pretrained")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            expected = {peft_tensor_name(n, part) for n in layers for part in ("lora_A", "lora_B")}
            if names != expected:
                odd = sorted(names ^ expected)[0]
                raise UserError(
                    f"{path} does not match the model: tensor {odd} is "
                    f"{'missing' if odd in expected else 'unexpected'}; "
                    f"the adapter was made for another model or other LoRA targets"
                )
            for name, layer in layers.items():
                for part in ("lora_A", "lora_B"):
                    tensor = f.get_tensor(peft_tensor_name(name, part))
                    target = getattr(layer, part).weight
                    if tensor.shape != target.shape:
                        raise UserError(
                            f"{path}: {peft_tensor_name(name, part)} has shape {tuple(tensor.shape)}, the model needs "
                            f"{tuple(target.shape)}; the adapter was made for another model"
                        )
                    with torch.no_grad():
                        target.copy_(tensor)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); save the adapter again") from None
    return config


def recorded_base_model(adapter_dir, base_model: str) -> str:
    """The base model an adapter's run recorded, for a command given no --model; refused where the
    record is a directory that is not here (the adapter or its base moved)."""
    if Path(base_model).is_absolute() and not Path(base_model).is_dir():
        raise UserError(
            f"{adapter_dir} was trained on {base_model}, which is not a directory here; pass its "
            f"base model with --model"
        )
    return base_model


def load_run_config(adapter_dir) -> dict:
    """qadapter_config.json of an output directory of train.py, checked for the keys a reader needs."""
    path = Path(adapter_dir) / RUN_CONFIG
    config = read_json_file(path, "--adapter needs an output directory of train.py", "train the adapter again")
    missing = [
        key for key in ("objective", "alpha", "alpha0", "base_model", "base_model_fingerprint") if key not in config
    ]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; train the adapter again")
    if config["objective"] == "rm":
        raise UserError(
            f"{adapter_dir} holds a reward model (train.py --objective rm), not an adapter; "
            f"evaluate.py judges replies with it as --reward_model {adapter_dir}"
        )
    return config


def read_policy(adapter: str, alpha0: float | None = None, scale: float = 1.0) -> Policy:
    """The policy an output directory of train.py defines, its update scaled by `scale`; alpha0 (if given)
    overrides a Q-Adapter's own."""
    config = load_run_config(adapter)
    objective = Objective.read(config)
    if alpha0 is not None and objective.policy_mode == "customised":
        objective = dataclasses.replace(objective, alpha0=alpha0)
    return Policy(
        str(adapter),
        objective.policy_mode,
        str(adapter),
        objective.alpha,
        objective.alpha0,
        objective,
        config["base_model"],
        config["base_model_fingerprint"],
        scale,
    )


def check_base(model: nn.Module, policy: Policy, model_name: str):
    """Refuse an adapter trained on another base model than this one."""
    if policy.adapter is not None and model_fingerprint(model) != policy.fingerprint:
        raise UserError(
            f"{policy.adapter} was trained on another base model than {model_name} (its config, tensor shapes or "
            f"weights differ); pass the adapter's own base model with --model, or train the adapter again"
        )


def remove_lora(model: nn.Module):
    """Take every LoRA layer off the model, leaving the plain linear layers with their frozen weights."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child_name = name.rpartition(".")
        plain = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False, device="meta")
        plain.weight = layer.weight
        setattr(model.get_submodule(parent_name), child_name, plain)


@contextmanager
def policy_applied(model: nn.Module, policy: Policy):
    """Inside this block the model carries the policy's adapter (none for the base model), its update
    scaled by the policy's scale, in eval mode; afterwards it is the bare base model again."""
    assert not lora_layers(model), "the model already carries an adapter"
    if policy.adapter is not None:
        load_adapter(model, policy.adapter)
        for layer in lora_layers(model).values():
            layer.scale *= policy.scale  # alpha/r times the knob: no weight is copied
    model.eval()
    try:
        yield model
    finally:
        remove_lora(model)


def policy_hidden(model: nn.Module, policy: Policy, tokens: torch.Tensor):
    """The final hidden states (B, T, C) the policy's logits come from, and for the customised policy those of
    the base model too (one forward pass over both copies of the batch); else None."""
    if policy.mode == "customised":
        rows = torch.arange(2 * tokens.shape[0], device=tokens.device) < tokens.shape[0]
        with adapter_on_rows(model, rows):
            both = model(tokens.repeat(2, 1), return_hidden=True)
        return both[: tokens.shape[0]], both[tokens.shape[0] :]
    with adapter_disabled(model) if policy.mode == "base" else nullcontext():
        return model(tokens, return_hidden=True), None


def log_softmax_of_policy(model: nn.Module, policy: Policy, hidden: torch.Tensor, base_hidden) -> torch.Tensor:
    """log pi(. | s) (N, V) in fp32 from final hidden states (N, C) (and the base model's, for pi~)."""
    logits = (hidden @ model.head_weight.T).float()
    if base_hidden is not None:
        logits = policy_logits(logits, base_hidden @ model.head_weight.T, policy.alpha, policy.alpha0)
    return logits.log_softmax(dim=-1)


@torch.no_grad()
def log_probs(
    model: nn.Module,
    policy: Policy,
    sequences: list[list[int]],
    num_scored: list[int],
    batch_size: int = 8,
    chunk_size: int = CHUNK_SIZE,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """For each token sequence, the summed log pi(a_t | s_t) of its last num_scored tokens given all before
    them, and whether each of those tokens is the policy's most likely one (greedy).

    The model reads each sequence without its last token, so sequences that differ only in their last
    token (the options of a multiple-choice question, one token each) share one forward pass. Those
    inputs run longest first, right-padded, batch_size at a time; the LM head is applied only at the
    scored positions, chunk_size at a time."""
    device = next(model.parameters()).device
    shared = {}  # (input, num_scored) -> the sequences that have it
    for i, (sequence, n) in enumerate(zip(sequences, num_scored)):
        shared.setdefault((tuple(sequence[:-1]), n), []).append(i)
    inputs = sorted(shared, key=lambda key: -len(key[0]))
    results = [None] * len(sequences)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        tokens = torch.zeros(len(batch), len(batch[0][0]), dtype=torch.long, device=device)
        # per scored state; targets: (states, most sequences sharing it)
        rows, positions, targets = ([], [], [])
        width = max(len(shared[key]) for key in batch)
        for row, (inp, n) in enumerate(batch):
            tokens[row, : len(inp)] = torch.tensor(inp, device=device)
            members = [sequences[i] for i in shared[(inp, n)]]
            for p in range(len(inp) - n, len(inp)):  # the states before the scored tokens
                rows.append(row)
                positions.append(p)
                column = [m[p + 1] for m in members]
                targets.append(column + column[-1:] * (width - len(column)))
        hidden, base_hidden = policy_hidden(model, policy, tokens)
        rows, positions = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
        targets = torch.tensor(targets, device=device)
        taken, greedy = [], []
        for chunk in range(0, len(rows), chunk_size):
            r, p, t = (x[chunk : chunk + chunk_size] for x in (rows, positions, targets))
            log_pi = log_softmax_of_policy(
                model, policy, hidden[r, p], None if base_hidden is None else base_hidden[r, p]
            )
            taken.append(log_pi.gather(1, t))
            greedy.append(log_pi.argmax(dim=1, keepdim=True) == t)
        taken, greedy = torch.cat(taken).double(), torch.cat(greedy)  # (states, width)
        first = 0
        for inp, n in batch:
            for column, i in enumerate(shared[(inp, n)]):
                results[i] = (
                    float(taken[first : first + n, column].sum()),
                    bool(greedy[first : first + n, column].all()),
                )
            first += n
        if progress is not None:
            progress.advance(sum(len(shared[key]) for key in batch))
    return results


@torch.no_grad()
def preference_metrics(
    model: nn.Module,
    policy: Policy,
    encoded_pairs,
    pad_id: int,
    micro_batch_size: int = 4,
    progress: Progress | None = None,
) -> dict:
    """preference_ and implicit_reward_ accuracy and margin (module docstring) over encoded pairs
    (data.encode_pairs), computed by the micro-batch function train.py runs."""
    whose = "qadapter" if policy.mode == "customised" else "dpo"  # whose policy R is of
    objective = dataclasses.replace(
        policy.objective or Objective(), name=whose, alpha=policy.alpha, alpha0=policy.alpha0
    )
    device = next(model.parameters()).device
    sums = dict.fromkeys(PAIR_METRICS, 0.0)
    for start in range(0, len(encoded_pairs), micro_batch_size):
        batch = encoded_pairs[start : start + micro_batch_size]
        tokens, response_mask = (t.to(device) for t in collate(batch, pad_id))
        with adapter_disabled(model) if policy.mode == "base" else nullcontext():
            _, metrics = micro_batch_objective(model, tokens, response_mask, objective)
        # (R, z) of each reply; a tie counts half a pair for z alone (the base model's z ties all)
        for kind, rewards, tie in [("preference", "rewards", 0), ("implicit_reward", "implicit_rewards", 0.5)]:
            chosen, rejected = metrics[rewards].double().chunk(2)
            wins = (chosen > rejected).sum() + tie * (chosen == rejected).sum()
            sums[f"{kind}_accuracy"] += float(wins)
            sums[f"{kind}_margin"] += float((chosen - rejected).sum())
        if progress is not None:
            progress.advance(len(batch))
    return {name: total / len(encoded_pairs) for name, total in sums.items()}


def reply_nll(model, policy: Policy, conversations: list[EncodedConversation], batch_size: int) -> dict:
    """The policy's mean negative log-likelihood per reply token over the conversations."""
    scored = [len(c.ids) - c.prompt_len for c in conversations]
    progress = Progress(f"{policy.name}: reply NLL", len(conversations), "conversations")
    sequences = [c.ids for c in conversations]
    sums = log_probs(model, policy, sequences, scored, batch_size, progress=progress)
    return {"nll_per_token": -sum(total for total, _ in sums) / sum(scored), "tokens": sum(scored)}
