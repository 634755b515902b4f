"""Chat with a base model or a customised one.

    python sample.py --adapter                      # the adapter train.py wrote to out/ (base model from its config)
    python sample.py --adapter DIR --prompt "Hi" --temperature 0
    python sample.py --adapter --compare --prompt "Hi"   # the base reply, then the customised one
    python sample.py --model meta-llama/Llama-3.1-8B-Instruct
    python sample.py --adapter --prompts prompts.jsonl --out replies.jsonl --batch_size 16   # many prompts at once

A Q-Adapter adapter is sampled from the customised policy softmax((Q + alpha0 * log pi1) / alpha) at
every step (docs/method.md), never from the adapter's logits alone; `--alpha0` changes the trade-off
between the new preference and the base model at inference time. A DPO adapter is sampled from the
adapter-on model. Without --prompt or --prompts, an interactive multi-turn chat starts: Ctrl-C stops a
reply and returns to the prompt, /reset starts a new conversation, /system TEXT sets the system
message (and starts anew), and Ctrl-D, or Ctrl-C at the prompt, leaves.

--prompts reads JSON Lines: {"messages": [...]} ending with a user turn, {"prompt": "text"}, or a record
of a preference file (its prompt is used), and writes each record back (UTF-8) with "reply" and
"finish_reason" added ("length" where --max_new_tokens cut the reply, else "stop"; "base_reply" and
"base_finish_reason" too with --compare), in input order, decoding --batch_size prompts together.
The first line also records what decides every reply ("sampled_with": model and a fingerprint of its
weights, adapter, alpha0, system message, sampling flags, seed): run again after an interruption, the
same command continues after the last complete line, and a command that differs in any of them is
refused, naming the flag. Each prompt samples from its own generator, seeded by --seed and its
number in the file, so its reply does not depend on its batch.
train.py --objective sft reads such a line back as its prompt and its "reply": the Replay baseline's data

    python sample.py --model M --prompts train.jsonl --out replay.jsonl --temperature 0 --unique
    python train.py --model M --objective sft --data train.jsonl replay.jsonl
"""

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from qadapter_min import UserError
from qadapter_min.common import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE_INT,
    Parser,
    add_compile_flag,
    check_output_file,
    checked,
    choose_dtype,
    default_device,
    run_command_line,
)
from qadapter_min.data import REPLY_KEYS
from qadapter_min.generate import generate, generate_batch
from qadapter_min.policy import BASE, Policy, check_base, load_adapter, read_policy, recorded_base_model
from qadapter_min.prompts import load_prompts
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model, model_fingerprint, resolve_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--adapter", nargs="?", const="out", help="an output directory of train.py (alone: out)")
    p.add_argument("--model", help="base model directory or Hub id (None: the adapter's base model)")
    p.add_argument("--prompt", help="one user message; without it, an interactive chat")
    p.add_argument("--system", default="", help="a system message")
    p.add_argument("--max_new_tokens", type=POSITIVE_INT, default=256, help="longest reply in tokens")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.6, help="sampling temperature; 0 is greedy")
    p.add_argument(
        "--top_p",
        type=checked(float, "in (0, 1]", lambda v: 0 < v <= 1),
        default=0.9,
        help="nucleus sampling: keep the most likely tokens up to this mass",
    )
    p.add_argument("--top_k", type=COUNT, default=0, help="keep only the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--alpha0", type=NON_NEGATIVE, help="weight of log pi1 in the customised policy (None: as trained)")
    add_compile_flag(p)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="weights' dtype (None: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compare", action="store_true", help="print the base model's reply, then the customised one")
    p.add_argument("--prompts", help="a JSON Lines file of prompts to reply to, all of them")
    p.add_argument("--out", help="with --prompts: the JSON Lines file of replies (- for stdout)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=8, help="with --prompts: prompts decoded together")
    p.add_argument(
        "--unique", action="store_true", help="with --prompts: reply once to each distinct prompt (its first record)"
    )
    args = p.parse_args(argv)
    if args.adapter is None and args.model is None:
        raise UserError("pass --adapter [DIR] for a customised model, or --model M for a base model alone")
    if args.prompt is not None and args.prompts is not None:
        raise UserError("pass --prompt for one message or --prompts FILE for many, not both")
    if args.compare and args.adapter is None:
        raise UserError(
            "--compare prints the base model's reply before the adapter's; pass --adapter DIR, or drop --compare"
        )
    if args.batch_size != p.get_default("batch_size") and args.prompts is None:
        raise UserError(
            "--batch_size sets how many prompts of --prompts decode together; pass "
            "--prompts FILE --out FILE.jsonl, or drop --batch_size"
        )
    if args.unique and args.prompts is None:
        raise UserError(
            "--unique picks the distinct prompts of a --prompts file; pass --prompts FILE --out FILE.jsonl too"
        )
    if (args.prompts is None) != (args.out is None):
        raise UserError(
            "--prompts FILE and --out FILE.jsonl go together: the prompts to reply to, and where the replies go"
        )
    if args.out not in (None, "-"):
        check_output_file("out", args.out)
    return args


def read_adapter_policy(args) -> Policy:
    """The policy to sample: the adapter's (read from its qadapter_config.json) or the base model's."""
    if args.adapter is None:
        return BASE
    policy = read_policy(args.adapter, args.alpha0)
    if args.alpha0 is not None and policy.mode != "customised":
        raise UserError(
            f"--alpha0 weighs pi1 in Q-Adapter's customised policy, and {args.adapter} is a "
            f"{policy.objective.name} adapter, sampled with the adapter on; drop --alpha0"
        )
    return policy


def load_policy(args, policy: Policy, model_name: str):
    """(model, tokenizer): the base model, with the policy's adapter put on it, if it has one."""
    device = default_device()
    model_dir = resolve_model_dir(model_name)
    tokenizer = Tokenizer(model_dir)
    model = load_model(model_dir, dtype=choose_dtype(args.dtype, device), device=device)
    check_base(model, policy, model_name)
    if policy.adapter is not None:
        load_adapter(model, policy.adapter)
    model.eval()  # the LoRA layers just added: no dropout
    return model, tokenizer


def reply(model, tokenizer, messages, policy_mode, alpha, alpha0, args) -> str:
    """One reply to a conversation, printed as it comes on a terminal (a pipe gets only the reply text)."""
    stream = sys.stdout.isatty()
    prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(args.seed)
    ids, shown = [], ""
    for token in generate(
        model,
        prompt_ids,
        stop_ids=tokenizer.stop_ids,
        max_new_tokens=args.max_new_tokens,
        policy_mode=policy_mode,
        alpha=alpha,
        alpha0=alpha0,
        compiled=args.compile,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
    ):
        ids.append(token)
        text = tokenizer.decode(ids)
        if stream and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown) :], end="", flush=True)
            shown = text
    text = tokenizer.decode(ids)
    print(text[len(shown) :] if stream else text, flush=True)
    return text


# What decides a reply besides its prompt, by flag: recorded with the first reply of --out (as
# "sampled_with", with a fingerprint of the model's weights), so that a run continued with any of them
# different is refused instead of mixing two runs' replies in one file.
SETTINGS = (
    "model",
    "adapter",
    "alpha0",
    "system",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "compare",
    "unique",
)


def sampling_settings(args, policy: Policy, model_name: str) -> dict:
    """This command's SETTINGS: the model and adapter as paths are written, alpha0 as the policy uses it."""
    values = {name: getattr(args, name) for name in SETTINGS}
    values.update(model=model_name, adapter=args.adapter and str(Path(args.adapter)))
    values["alpha0"] = policy.alpha0 if policy.mode == "customised" else None
    return values


def reply_to_prompts(items, done, recorded, model, tokenizer, policy, settings, args):
    """Replies to every prompt of --prompts after the first `done` (those an earlier run of the same
    command wrote; recorded: its settings), --batch_size at a time, appended to --out line by line."""
    settings = {**settings, "model_fingerprint": model_fingerprint(model)}
    if recorded is not None and recorded.get("model_fingerprint") != settings["model_fingerprint"]:
        raise UserError(
            f"--out {args.out} holds replies of a model whose weights differ from {settings['model']}'s;"
            f" rerun with the model it was made with, or pass another --out"
        )
    system = [{"role": "system", "content": args.system}] if args.system else []
    encoded = [
        tokenizer.encode_chat((system if m[0]["role"] != "system" else []) + m, add_generation_prompt=True)
        for _, m in items
    ]
    for index, prompt in enumerate(encoded):  # refused before any decoding
        if len(prompt) + args.max_new_tokens > model.args.max_position_embeddings:
            raise UserError(
                f"{args.prompts}: the prompt of record {index + 1} has {len(prompt)} tokens, more than the "
                f"model's context leaves for --max_new_tokens {args.max_new_tokens}; shorten it"
            )
    to_stdout = args.out == "-"
    with nullcontext(sys.stdout) if to_stdout else open(args.out, "a", encoding="utf-8") as out:
        write_replies(items, encoded, done, out, to_stdout, model, tokenizer, policy, settings, args)


def write_replies(items, encoded, done, out, to_stdout, model, tokenizer, policy, settings, args):
    """Decode the prompts after the first `done`, a batch at a time, each batch's lines written whole
    (the first line of a new file also records the settings); Ctrl-C says how far it got."""
    device = next(model.parameters()).device
    started, tokens, finished = time.time(), 0, done
    streams = [("reply", "finish_reason", policy.mode)]
    if args.compare and policy.mode != "base":
        streams.append(("base_reply", "base_finish_reason", "base"))
    try:
        for start in range(done, len(items), args.batch_size):
            batch, prompts = (items[start : start + args.batch_size], encoded[start : start + args.batch_size])
            records = [dict(record) for record, _ in batch]
            if start == 0:
                records[0]["sampled_with"] = settings
            for key, finish, policy_mode in streams:
                generators = [
                    torch.Generator(device).manual_seed(args.seed + index) for index in range(start, start + len(batch))
                ]
                ids = generate_batch(
                    model,
                    prompts,
                    stop_ids=tokenizer.stop_ids,
                    max_new_tokens=args.max_new_tokens,
                    policy_mode=policy_mode,
                    alpha=policy.alpha,
                    alpha0=policy.alpha0,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    generators=generators,
                    compiled=args.compile,
                )
                for record, reply_ids in zip(records, ids):
                    record[key] = tokenizer.decode(reply_ids)
                    # as OpenAI-style tools mark it: "length" where --max_new_tokens cut it, else "stop"
                    record[finish] = "length" if len(reply_ids) == args.max_new_tokens else "stop"
                tokens += sum(map(len, ids))
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            out.flush()
            if not to_stdout:
                os.fsync(out.fileno())  # a line on disk is a whole line: a crash loses this batch
            finished, elapsed = start + len(batch), time.time() - started
            eta = elapsed / (finished - done) * (len(items) - finished)
            print(
                f"\r{finished}/{len(items)} prompts, {tokens / elapsed:.0f} tokens/s, ETA {eta:.0f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )
    except KeyboardInterrupt:
        again = "" if to_stdout else f" in {args.out}; the same command continues from there"
        raise KeyboardInterrupt(f"{finished} of {len(items)} prompts have replies{again}") from None
    print(file=sys.stderr)


def completed_lines(path: Path, items, settings: dict) -> tuple[int, dict | None]:
    """How many prompts an earlier run of the same command has already answered in --out, and the
    settings it recorded; a half-written last line is cut off. Refuses an --out that holds replies to
    other prompts, or replies sampled with other flags."""
    if not path.exists():
        return 0, None
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        path.write_bytes(whole)
    lines = whole.decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = {k: v for k, v in json.loads(line).items() if k not in REPLY_KEYS}
        except (json.JSONDecodeError, AttributeError):
            record = None
        if number > len(items) or record != items[number - 1][0]:
            raise UserError(f"--out {path} holds replies to other prompts (line {number}); pass another --out")
    if not lines:
        return 0, None
    recorded = json.loads(lines[0]).get("sampled_with")
    if not isinstance(recorded, dict):
        raise UserError(f"--out {path} does not say how its replies were sampled; pass another --out")
    for name, value in settings.items():
        if recorded.get(name) != value:
            raise UserError(
                f"--out {path} holds replies sampled with --{name} {recorded.get(name)}, and this "
                f"command has --{name} {value}; rerun with the file's flags, or pass another --out"
            )
    return len(lines), recorded


def main(argv=None):
    args = parse_args(argv)
    policy = read_adapter_policy(args)
    model_name = args.model or recorded_base_model(policy.adapter, policy.base_model)
    # a bad prompts file is refused before loading
    items = load_prompts(args.prompts, args.unique) if args.prompts else None
    settings = sampling_settings(args, policy, model_name)
    done, recorded = 0, None
    if items is not None and args.out != "-":
        done, recorded = completed_lines(Path(args.out), items, settings)
        if done == len(items):
            print(f"--out {args.out} holds replies to all {done} prompts already; nothing to do", file=sys.stderr)
            return
    model, tokenizer = load_policy(args, policy, model_name)
    mode, alpha, alpha0 = policy.mode, policy.alpha, policy.alpha0
    if items is not None:
        reply_to_prompts(items, done, recorded, model, tokenizer, policy, settings, args)
        return

    def answer(messages) -> str:
        if args.compare and mode != "base":
            print("[base]", flush=True)
            reply(model, tokenizer, messages, "base", alpha, alpha0, args)
            print("[customised]", flush=True)
        return reply(model, tokenizer, messages, mode, alpha, alpha0, args)

    if args.prompt is not None:
        answer(conversation(args.system) + [{"role": "user", "content": args.prompt}])
        return
    adapter = f" + {args.adapter} ({mode})" if args.adapter else ""
    chat(answer, args.system, f"chatting with {model_name}{adapter}")


CHAT_KEYS = (
    "Ctrl-C stops a reply; /reset starts a new conversation; /system TEXT sets the system message "
    "(and starts anew); Ctrl-D, or Ctrl-C at the prompt, leaves"
)


def conversation(system: str) -> list[dict]:
    """A new conversation: the system message alone, if there is one."""
    return [{"role": "system", "content": system}] if system else []


def chat(answer, system: str, banner: str):
    """The interactive chat (CHAT_KEYS). The banner and notes go to stderr, so that stdout holds the
    replies alone; on a terminal readline is given the prompt, so history and editing redraw it."""
    print(f"{banner}; {CHAT_KEYS}", file=sys.stderr)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if terminal:
        import readline  # noqa: F401  (line editing and history for input())
    history = conversation(system)
    while True:
        try:
            if terminal:
                message = input("> ")
            else:
                print("> ", end="", file=sys.stderr, flush=True)
                message = input()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # end the prompt's line
            return
        command, _, text = message.strip().partition(" ")
        if command in ("/reset", "/system"):
            system = text.strip() if command == "/system" else system
            history = conversation(system)
            print(f"(a new conversation{', system message set' * (command == '/system')})", file=sys.stderr)
            continue
        if not message.strip():
            continue
        turn = history + [{"role": "user", "content": message}]
        try:
            reply_text = answer(turn)
        except KeyboardInterrupt:  # the reply stops; the conversation stays as it was before it
            print("\n(reply stopped; the conversation goes on from before it)", file=sys.stderr)
            continue
        history = turn + [{"role": "assistant", "content": reply_text}]


if __name__ == "__main__":
    run_command_line(main)
