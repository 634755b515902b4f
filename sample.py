"""Chat with a base model or a customised one.

    python sample.py --adapter                      # the adapter train.py wrote to out/ (base model from its config)
    python sample.py --adapter DIR --prompt "Hi" --temperature 0
    python sample.py --adapter --compare --prompt "Hi"   # the base reply, then the customised one
    python sample.py --model meta-llama/Llama-3.1-8B-Instruct

A Q-Adapter adapter is sampled from the customised policy softmax((Q + alpha0 * log pi1) / alpha) at
every step (DESIGN.md section 1), never from the adapter's logits alone; `--alpha0` changes the
trade-off between the new preference and the base model at inference time. A DPO adapter is sampled
from the adapter-on model. Without --prompt, an interactive multi-turn chat starts.
"""

import argparse
import sys
from pathlib import Path

import torch

from qadapter_min import UserError
from qadapter_min.generate import generate
from qadapter_min.lora import load_adapter
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model, model_fingerprint, read_json_file, resolve_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", nargs="?", const="out", default=None, help="an output directory of train.py (default: out)")
    p.add_argument("--model", default=None, help="base model directory or Hub id (default: the adapter's base model)")
    p.add_argument("--prompt", default=None, help="one user message; without it, an interactive chat")
    p.add_argument("--system", default="", help="a system message")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 is greedy")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep the most likely tokens up to this mass")
    p.add_argument("--top_k", type=int, default=0, help="keep only the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--alpha0", type=float, default=None, help="weight of log pi1 in the customised policy (default: as trained)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="weights' dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compare", action="store_true", help="print the base model's reply, then the customised one")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens <= 0:
        raise UserError("--temperature must be >= 0, --top_p in (0, 1], --top_k >= 0 and --max_new_tokens > 0")
    if args.adapter is None and args.model is None:
        raise UserError("pass --adapter [DIR] for a customised model, or --model M for a base model alone")
    config = None
    if args.adapter is not None:
        config = read_json_file(
            Path(args.adapter) / "qadapter_config.json",
            "--adapter needs an output directory of train.py", "train the adapter again",
        )
        missing = [k for k in ("objective", "alpha", "alpha0", "base_model", "base_model_fingerprint") if k not in config]
        if missing:
            raise UserError(f"{args.adapter}/qadapter_config.json lacks {', '.join(missing)}; train the adapter again")
    model_name = args.model or config["base_model"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model_dir = resolve_model_dir(model_name)
    tokenizer = Tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)

    mode = "base"
    if config is not None:
        if model_fingerprint(model) != config["base_model_fingerprint"]:
            raise UserError(
                f"{args.adapter} was trained on another base model than {model_name} (its config, tensor shapes or "
                f"weights differ); pass the adapter's own base model with --model, or train the adapter again"
            )
        load_adapter(model, args.adapter)
        mode = "adapter" if config["objective"] == "dpo" else "customised"
    model.eval()  # no LoRA dropout
    alpha = config["alpha"] if config else 1.0
    alpha0 = args.alpha0 if args.alpha0 is not None else (config["alpha0"] if config else 0.01)
    stream = sys.stdout.isatty()  # a terminal sees tokens as they come; a pipe gets only the reply text

    def reply(messages, policy_mode) -> str:
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        generator = torch.Generator(device).manual_seed(args.seed)
        ids, shown = [], ""
        for token in generate(
            model, prompt_ids, stop_ids=tokenizer.stop_ids, max_new_tokens=args.max_new_tokens,
            policy_mode=policy_mode, alpha=alpha, alpha0=alpha0, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, generator=generator,
        ):
            ids.append(token)
            text = tokenizer.decode(ids)
            if stream and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(shown):], end="", flush=True)
                shown = text
        text = tokenizer.decode(ids)
        print(text[len(shown):] if stream else text, flush=True)
        return text

    def answer(messages) -> str:
        if args.compare and mode != "base":
            print("[base]", flush=True)
            reply(messages, "base")
            print("[customised]", flush=True)
        return reply(messages, mode)

    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        answer(history + [{"role": "user", "content": args.prompt}])
        return
    # the banner and the prompt go to stderr, so that stdout holds the replies alone
    print(f"chatting with {model_name}" + (f" + {args.adapter} ({mode})" if config else "") + "; Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)
            message = input()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": answer(history)})


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
