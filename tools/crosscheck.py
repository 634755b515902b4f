"""Cross-check qadapter-min against transformers and peft, by hand (they are not dependencies).

    python -m venv /tmp/xcheck --system-site-packages && /tmp/xcheck/bin/pip install transformers peft
    /tmp/xcheck/bin/python tools/crosscheck.py chat --tokenizer path/to/tokenizer.json --template llama31.jinja
    /tmp/xcheck/bin/python tools/crosscheck.py peft --model tests/fixtures/tiny-llama-tied
    /tmp/xcheck/bin/python tools/crosscheck.py sample --adapter out

chat    encode_chat against the official chat template (a Jinja file you supply, e.g. the chat_template of
        meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json) rendered and tokenized by transformers.
peft    an adapter written by save_adapter, loaded with peft onto transformers' Llama: logits compared.
sample  sample.py's greedy reply against the customised policy recomputed with transformers + peft
        (the whole sequence at every step, adapter on and off).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qadapter_min.adapters import save_adapter  # noqa: E402
from qadapter_min.lora import add_lora, lora_layers  # noqa: E402
from qadapter_min.policy import load_run_config  # noqa: E402
from qadapter_min.tokenizer import Tokenizer  # noqa: E402
from qadapter_min.weights import load_model  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": " hi there  "},
        {"role": "assistant", "content": "Hello! How can I help?\n\n"},
        {"role": "user", "content": "Tell me a joke.\n\n1. about cats\n2. about dogs"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "ünïcödé 日本語 🙂 code:\n```py\nx = 1\n```"},
        {"role": "assistant", "content": "   ok"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
]


def check_chat(tokenizer_file, template_file):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<|begin_of_text|>")
    template = Path(template_file).read_text()
    ours = Tokenizer(tokenizer_file)
    same = total = 0
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            for extra in ({}, {"date_string": "01 Jan 2025"}):
                expected = reference.apply_chat_template(
                    messages,
                    chat_template=template,
                    tokenize=True,
                    add_generation_prompt=add_generation_prompt,
                    **extra,
                )
                expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
                got = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
                same += got == expected
                total += 1
    print(f"chat format: {same} of {total} renderings give identical ids")


def check_peft(model_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ours = add_lora(
        load_model(model_dir),
        r=8,
        alpha=16,
        dropout=0.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3)
    tokens = torch.randint(0, ours.args.vocab_size, (2, 40), generator=generator)
    with tempfile.TemporaryDirectory() as adapter_dir:
        save_adapter(ours, adapter_dir, base_model_name_or_path=str(model_dir))
        reference = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir
        )
        with torch.no_grad():
            expected = reference.eval()(tokens).logits
            got = ours.eval()(tokens)
            with reference.disable_adapter():
                base = reference(tokens).logits
    print(
        f"peft: max |peft - ours| = {(expected - got).abs().max():.2e}; the adapter moves the logits by "
        f"{(expected - base).abs().max():.2f}"
    )


def check_sample(adapter_dir, prompts, max_new_tokens=32):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    config = load_run_config(adapter_dir)
    model_dir, alpha, alpha0 = config["base_model"], config["alpha"], config["alpha0"]
    tokenizer = Tokenizer(model_dir)  # its chat format was checked against the template by `chat`
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir
    ).eval()
    for prompt in prompts:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        reply = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                tokens = torch.tensor([ids + reply])
                q = model(tokens).logits[0, -1]
                with model.disable_adapter():
                    base = model(tokens).logits[0, -1]
                token = int(((q + alpha0 * base.log_softmax(-1)) / alpha).argmax())
                if token in tokenizer.stop_ids:
                    break
                reply.append(token)
        expected = tokenizer.decode(reply)
        got = subprocess.run(
            [
                sys.executable,
                str(ROOT / "sample.py"),
                "--adapter",
                str(adapter_dir),
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max_new_tokens",
                str(max_new_tokens),
            ],
            capture_output=True,
            text=True,
        ).stdout.removesuffix("\n")
        print(
            f"sample: {'identical' if got == expected else 'DIFFERENT'}: {prompt!r} -> {expected!r}"
            + ("" if got == expected else f" (sample.py: {got!r})")
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["chat", "peft", "sample"])
    p.add_argument("--tokenizer", help="chat: a Llama 3 tokenizer.json")
    p.add_argument("--template", help="chat: the official chat template, as a Jinja file")
    p.add_argument(
        "--model", default=str(ROOT / "tests" / "fixtures" / "tiny-llama-tied"), help="peft: a model directory"
    )
    p.add_argument("--adapter", default="out", help="sample: an output directory of train.py")
    p.add_argument(
        "--prompts",
        nargs="+",
        default=[
            "What is the capital of Peru?",
            "What is the opposite of hot?",
            "Write this word in upper case: river",
        ],
        help="sample: prompts",
    )
    args = p.parse_args()
    if args.check == "chat":
        check_chat(args.tokenizer, args.template)
    elif args.check == "peft":
        check_peft(args.model)
    else:
        check_sample(args.adapter, args.prompts)


if __name__ == "__main__":
    main()
