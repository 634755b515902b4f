"""Judging replies with a reward model: each policy's greedy replies to prompts, scored by a Llama in
Hugging Face's LlamaForSequenceClassification layout (train.py --objective rm writes one, reward.py), and
each policy's win rate against the base model's replies.

The reward of a conversation is score.weight @ h, h the final normed hidden state at its last token, the
conversation encoded in the reward model's own chat format (the Llama 3.1 one: BOS first, the reply closed
by <|eot_id|>). Win rate of A against B: the share of prompts where A's reply gets the larger reward, ties
counting half.
"""

import torch

from qadapter_min import UserError
from qadapter_min.common import Progress, choose_dtype, read_json_file
from qadapter_min.generate import generate_batch
from qadapter_min.model import Transformer
from qadapter_min.policy import Policy
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import CONFIG_FILE, check_score_head, load_model, resolve_model_dir, safetensors_files


def check_reward_model(path_or_repo_id):
    """The reward model's directory, checked before any model is loaded: not an adapter, a one-row
    score.weight head, and a pad token id in its config.json."""
    model_dir = resolve_model_dir(path_or_repo_id)
    if (model_dir / "adapter_config.json").is_file():
        raise UserError(
            f"--reward_model {path_or_repo_id} is an adapter, not a reward model; pass a reward model "
            f"(train.py --objective rm writes one), and adapters with --adapter"
        )
    check_score_head(model_dir, safetensors_files(model_dir))
    config = read_json_file(model_dir / CONFIG_FILE, "a reward model needs its config.json", "restore it")
    if config.get("pad_token_id") is None:
        raise UserError(
            f"{model_dir / CONFIG_FILE} has no pad_token_id, without which transformers cannot find the "
            f"last token of a padded batch's rows; set it to the id of the tokenizer's padding token"
        )
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
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, against)) / len(scores)


def greedy_replies(model, tokenizer, policy: Policy, prompts, args) -> list[str]:
    """The policy's greedy reply to each prompt, --batch_size prompts decoded together."""
    replies, progress = [], Progress(f"{policy.name}: replies", len(prompts), "prompts")
    for start in range(0, len(prompts), args.batch_size):
        batch = [
            tokenizer.encode_chat(messages, add_generation_prompt=True)
            for _, messages in prompts[start : start + args.batch_size]
        ]
        for ids in generate_batch(
            model,
            batch,
            stop_ids=tokenizer.stop_ids,
            max_new_tokens=args.max_new_tokens,
            policy_mode=policy.mode,
            alpha=policy.alpha,
            alpha0=policy.alpha0,
            compiled=args.compile,
        ):
            replies.append(tokenizer.decode(ids, skip_special_tokens=True))
        progress.advance(len(batch))
    return replies


def judge(results: list[dict], prompts, reward_model_dir, device, args) -> list[dict]:
    """Each model's mean reward and win rate against the base model (the first), into its result; and a
    record per prompt: the conversation, every model's reply and reward."""
    reward_model = load_reward_model(reward_model_dir, dtype=choose_dtype(args.dtype, device), device=device)
    tokenizer = Tokenizer(reward_model_dir)  # the conversation as the reward model reads it
    scores = {}
    for result in results:
        conversations = [
            messages + [{"role": "assistant", "content": reply}]
            for (_, messages), reply in zip(prompts, result["replies"])
        ]
        scores[result["name"]] = rewards(
            reward_model, [tokenizer.encode_chat(c) for c in conversations], args.batch_size
        )
    base = scores[results[0]["name"]]
    for result in results:
        mine = scores[result["name"]]
        result["reward"] = {"mean": sum(mine) / len(mine), "win_rate_against_base": win_rate(mine, base)}
    return [
        {
            "messages": messages,
            "replies": {r["name"]: r["replies"][i] for r in results},
            "rewards": {r["name"]: scores[r["name"]][i] for r in results},
        }
        for i, (_, messages) in enumerate(prompts)
    ]
