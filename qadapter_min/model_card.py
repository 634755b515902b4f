"""The model card, README.md, that train.py writes beside an adapter or a reward model and export.py
beside a merged model: the Hub's metadata block, then what the model is, the policy it defines and how
to sample it (or how a reward model scores), what it was trained on, its last numbers, and the command
that made it."""

import shlex

POLICIES = {
    "qadapter": (
        "the customised policy pi~ = softmax((Q + alpha0 log pi1) / alpha), where Q is the adapter-on "
        "model's logits and pi1 the base model's: every token needs both"
    ),
    "dpo": "the adapter-on model, softmax(logits), as any LoRA loader gives it",
    "sft": "the adapter-on model, softmax(logits), as any LoRA loader gives it",
}
REWARD_MODEL = (
    "In transformers' LlamaForSequenceClassification layout, its LoRA merged into the "
    "base weights: the reward of a conversation is score.weight @ h, h the final hidden state at its "
    "last token, trained on preference pairs with the Bradley-Terry loss -log sigmoid(r(y_w) - r(y_l))."
)


KINDS = {(False, False): "A LoRA adapter", (True, False): "A merged model", (False, True): "A reward model"}


def command(args: dict, defaults: dict) -> str:
    """The train.py command that made the run: every flag that differs from its default."""
    words = ["python", "train.py"]
    for name, value in args.items():
        if name in ("resume", "overwrite") or value == defaults.get(name):
            continue
        if value is True:
            words.append(f"--{name}")
        elif value not in (False, None):
            values = value if isinstance(value, list) else [value]
            words += [f"--{name}", *map(str, values)]
    return shlex.join(words)


def model_card(config: dict, metrics: list[dict], defaults: dict, out: str, exported: bool = False) -> str:
    """config: qadapter_config.json; metrics: metrics.jsonl's rows; defaults: train.py's flag defaults;
    out: the adapter's directory (for an export, the adapter it was made from)."""
    args, name = config.get("args"), config["objective"]
    merged = exported or name == "rm"  # weights of its own, not an adapter
    last = next((row for row in reversed(metrics) if "loss" in row), {})
    evaluated = next((row for row in reversed(metrics) if "eval_loss" in row), {})
    settings = {"qadapter": ("alpha", "alpha0", "beta", "gamma", "chi2"), "dpo": ("dpo_beta",)}
    lines = [
        "---",
        f"base_model: {config['base_model']}",
        f"library_name: {'transformers' if merged else 'peft'}",
        "tags:",
        "- qadapter-min",
        "- lora",
        f"- {name}",
        "---",
        "",
        f"# {KINDS[exported, name == 'rm']} of {config['base_model']}, trained with {name}",
        "",
        "Made with qadapter-min. "
        + (
            f"The adapter of `{out}` merged into the base weights, W + (alpha/r) B A: a plain model."
            if exported
            else REWARD_MODEL
            if name == "rm"
            else "An adapter in PEFT's layout, with qadapter_config.json beside it."
        ),
        "",
    ]
    if name == "rm":
        lines += [
            "## Judging replies",
            "",
            f"`python evaluate.py --prompts FILE --reward_model {out}` judges every model's greedy "
            f"replies with it; transformers' AutoModelForSequenceClassification loads it as it is.",
        ]
    else:
        lines += ["## The policy", "", f"The adapter defines {POLICIES[name]}."]
    if name == "qadapter":
        lines += [
            f"Sample it with `python sample.py --adapter {out}` (alpha {config['alpha']:g}, alpha0 "
            f"{config['alpha0']:g}). "
            + (
                "This merged model is softmax(Q) alone, which is pi~ only at alpha 1 and alpha0 0."
                if exported
                else "peft, vLLM and lm-eval's hf backend load the adapter as softmax(Q) instead, which "
                "is pi~ only at alpha 1 and alpha0 0."
            )
        ]
    elif name != "rm":
        lines.append(f"Sample it with `python sample.py --adapter {out}`, or any LoRA loader.")
    lines += [
        "",
        "## Training",
        "",
        f"- objective: {name}" + "".join(f", {key} {config[key]}" for key in settings.get(name, ()) if key in config),
    ]
    if args is None:  # an adapter marked for qadapter-min, not trained by train.py
        return "\n".join([*lines, "- not trained by train.py: no record of its data or steps", ""])
    pairs = round(config["steps"] * args["batch_size"] / config["epochs"]) if config["epochs"] else 0
    lines += [
        f"- data: {', '.join(args['data'])} ({pairs} pairs used)",
        f"- steps: {config['steps']} of {args['batch_size']} pairs ({config['epochs']:.2f} epochs), "
        f"lr {args['lr']}, LoRA r {args['lora_r']} / alpha {args['lora_alpha']} on "
        f"{' '.join(args['lora_targets'])}",
    ]
    for title, row in (("last metrics", last), ("last evaluation", evaluated)):
        if row:
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
            lines.append(f"- {title} (step {row['step']}): {numbers}")
    lines += ["", "Made by:", "", "```", command(args, defaults), "```", ""]
    return "\n".join(lines)
