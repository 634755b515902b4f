"""The table train.py prints after a run on the built-in world: the base model beside the customised
one, on both axes of the paper. What the model learned: the preference (held-out implicit-reward
accuracy, and the share of greedy replies that take the prefix). What it kept: the skills (the share of
greedy replies that are correct once the prefix is removed)."""

import random
from contextlib import nullcontext

import torch

from qadapter_min.data import collate
from qadapter_min.generate import generate
from qadapter_min.lora import adapter_disabled
from qadapter_min.objective import OBJECTIVE_SETTINGS, POLICY_OF_OBJECTIVE
from qadapter_min.step import micro_batch_objective
from qadapter_min.tokenizer import Tokenizer
from toyworld import PREFERENCE_SKILLS, SKILLS, check_reply, make_task


def evaluation_prompts(per_skill: int = 30, seed: int = 1234) -> list[tuple[str, str, str]]:
    """(skill, question, answer) triples held out from the preference data."""
    rng = random.Random(seed)
    return [(skill, *make_task(skill, rng)) for skill in SKILLS for _ in range(per_skill)]


@torch.no_grad()
def greedy_report(model, tokenizer: Tokenizer, policy_mode: str, alpha: float, alpha0: float, per_skill: int = 30) -> dict:
    """preference_rate and skill_accuracy of greedy replies, overall and per skill."""
    shown, correct, counts = {}, {}, {}
    for skill, question, answer in evaluation_prompts(per_skill):
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        reply_ids = list(generate(model, prompt, stop_ids=tokenizer.stop_ids, max_new_tokens=32,
                                  policy_mode=policy_mode, alpha=alpha, alpha0=alpha0))
        preferred, right = check_reply(tokenizer.decode(reply_ids), answer)
        shown[skill] = shown.get(skill, 0) + preferred
        correct[skill] = correct.get(skill, 0) + right
        counts[skill] = counts.get(skill, 0) + 1
    total = sum(counts.values())
    return {
        "preference_rate": sum(shown.values()) / total,
        "skill_accuracy": sum(correct.values()) / total,
        "preference_rate_by_skill": {s: shown[s] / counts[s] for s in SKILLS},
        "skill_accuracy_by_skill": {s: correct[s] / counts[s] for s in SKILLS},
    }


@torch.no_grad()
@torch.no_grad()
def preference_accuracy(model, encoded_pairs, pad_id: int, policy_mode: str, args) -> float:
    """Share of held-out pairs whose chosen reply gets the larger implicit reward R (objective.py's
    `loss_from_hidden`) under the policy being evaluated: pi~ ("customised"), the adapter-on model
    ("adapter"), or pi1 itself ("base": the adapter-on model with the adapter off)."""
    settings = {name: getattr(args, name) for name in OBJECTIVE_SETTINGS}
    settings["objective"] = "qadapter" if policy_mode == "customised" else "dpo"  # whose policy R is of
    device = next(model.parameters()).device
    wins = 0
    for start in range(0, len(encoded_pairs), args.micro_batch_size):
        batch = encoded_pairs[start : start + args.micro_batch_size]
        tokens, response_mask = (t.to(device) for t in collate(batch, pad_id))
        with adapter_disabled(model) if policy_mode == "base" else nullcontext():
            _, metrics = micro_batch_objective(model, tokens, response_mask, settings)
        rewards = metrics["rewards"]
        wins += int((rewards[: len(batch)] > rewards[len(batch) :]).sum())
    return wins / len(encoded_pairs)


def compare(model, tokenizer: Tokenizer, eval_pairs, pad_id: int, args) -> dict:
    """The report: the base model beside the customised one, in the same numbers."""
    model.eval()
    report = {}
    for name, policy_mode in (("base", "base"), ("customised", POLICY_OF_OBJECTIVE[args.objective])):
        report[name] = {
            "preference_accuracy": preference_accuracy(model, eval_pairs, pad_id, policy_mode, args),
            **greedy_report(model, tokenizer, policy_mode, args.alpha, args.alpha0),
        }
    return report


def format_report(report: dict, objective: str) -> str:
    """The table train.py prints."""
    base, customised = report["base"], report["customised"]
    lines = [f"{'':42}{'base':>8}{objective:>12}"]

    def row(label, key, skill=None):
        a = base[key] if skill is None else base[key + "_by_skill"][skill]
        b = customised[key] if skill is None else customised[key + "_by_skill"][skill]
        lines.append(f"{label:42}{a:8.2f}{b:12.2f}")

    row("preference accuracy (held out)", "preference_accuracy")
    row("preference rate (greedy replies)", "preference_rate")
    for skill in SKILLS:
        row(f"  {skill} ({'in' if skill in PREFERENCE_SKILLS else 'not in'} the preference data)", "preference_rate", skill)
    row("skill accuracy (retention)", "skill_accuracy")
    for skill in SKILLS:
        row(f"  {skill}", "skill_accuracy", skill)
    return "\n".join(lines)
