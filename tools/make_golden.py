"""Write the tiny checkpoints and golden logits under tests/fixtures/, using Hugging Face transformers.

The test suite checks our Llama against these files without needing transformers. To regenerate
(on a machine of your own; transformers is not a dependency of qadapter-min):

    python -m venv /tmp/xcheck --system-site-packages && /tmp/xcheck/bin/pip install transformers
    /tmp/xcheck/bin/python tools/make_golden.py [fixture names; all by default]

Each fixture directory holds what `save_pretrained` wrote (config.json, safetensors) and
golden.safetensors with `input_ids` (2, 80) and the float32 `logits` (2, 80, V) of transformers'
eager-attention LlamaForCausalLM. The sequences are longer than the llama3 scaling's
original_max_position_embeddings (32), so all three frequency bands of the scaling are exercised.
tiny-reward-llama is a LlamaForSequenceClassification reward model with golden.json: conversations, their
ids and transformers' reward of each. tiny-chatml is a tokenizer of the ChatML kind (SmolLM2's special
tokens and chat template in tokenizer_config.json) with golden.json: conversations and the ids of
transformers' apply_chat_template for each, with and without the generation prompt. trained-reward
holds pairs.jsonl and golden.json: transformers' rewards from a reward model train.py trains on them.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)


def make(name: str, classic_config: bool, max_shard_size: str, **shape):
    torch.manual_seed(sum(map(ord, name)))
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling=dict(ROPE),
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
        **shape,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init is small; larger weights make the logits more telling
        for param in model.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    out = FIXTURES / name
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if classic_config:  # rewrite the newer rope_parameters form as the classic rope_theta + rope_scaling
        cfg = json.loads((out / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        cfg.pop("head_dim")  # older configs leave it out: hidden_size / num_attention_heads
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    input_ids = torch.randint(0, config.vocab_size, (2, 80))
    with torch.no_grad():
        logits = model(input_ids).logits.float()
    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, out / "golden.safetensors")
    print(name, sorted(p.name for p in out.iterdir()))


def make_reward(name: str, tokenizer_dir: Path):
    """A reward model in the LlamaForSequenceClassification layout (num_labels 1), with the tokenizer of
    tokenizer_dir, and golden.json: conversations, their ids in the Llama 3.1 chat format (encode_chat,
    checked against the official template elsewhere) and transformers' reward of each, scored alone."""
    sys.path.insert(0, str(FIXTURES.parent.parent))
    from qadapter_min.tokenizer import Tokenizer

    torch.manual_seed(sum(map(ord, name)))
    tokenizer = Tokenizer(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=500000.0,
        num_labels=1,
        bos_token_id=tokenizer.bos_id,
        pad_token_id=tokenizer.pad_id,  # transformers reads a padded row's reward before the first pad
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    out = FIXTURES / name
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    conversations = [
        [{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue, the colour of a clear sky on a summer day."},
        ],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Say a word."},
            {"role": "assistant", "content": "moon"},
        ],
    ]
    input_ids = [tokenizer.encode_chat(c) for c in conversations]
    with torch.no_grad():
        rewards = [model(torch.tensor([ids])).logits[0, 0].item() for ids in input_ids]
    (out / "golden.json").write_text(
        json.dumps({"conversations": conversations, "input_ids": input_ids, "rewards": rewards})
    )
    print(name, sorted(p.name for p in out.iterdir()))


TRAINED_REWARD_FLAGS = [  # train.py's flags for the trained-reward fixture (golden.json's "flags")
    "--objective",
    "rm",
    "--batch_size",
    "4",
    "--micro_batch_size",
    "2",
    "--max_steps",
    "4",
    "--lr",
    "0.01",
    "--dtype",
    "fp32",
    "--max_len",
    "128",
]


def make_trained_reward(name: str, base: Path):
    """A reward model that train.py --objective rm trains on the lm-eval fixture's model (untied: its
    LM head is left out) from pairs.jsonl, and golden.json: conversations, their ids, and the reward of
    each that transformers' AutoModelForSequenceClassification gives when it loads train.py's output as
    it is and scores the conversations in one right-padded batch. The test trains the same run again
    and scores the conversations with evaluate.py's reader; the checkpoint itself is not kept."""
    import subprocess
    import tempfile

    from transformers import AutoModelForSequenceClassification

    sys.path.insert(0, str(FIXTURES.parent.parent))
    from qadapter_min.tokenizer import Tokenizer

    out = FIXTURES / name
    out.mkdir(exist_ok=True)
    pairs = out / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(8):
            prompt = [{"role": "user", "content": f"Name a number near {i}."}]
            f.write(
                json.dumps(
                    {
                        "chosen": prompt + [{"role": "assistant", "content": f"Sure! {i + 1}."}],
                        "rejected": prompt + [{"role": "assistant", "content": f"{i * 7} maybe"}],
                    }
                )
                + "\n"
            )
    with tempfile.TemporaryDirectory() as directory:
        trained = Path(directory) / "rm"
        command = [sys.executable, "train.py", "--model", str(base), "--data", str(pairs)]
        subprocess.run(command + TRAINED_REWARD_FLAGS + ["--out", str(trained)], check=True, cwd=FIXTURES.parent.parent)
        tokenizer = Tokenizer(trained)
        conversations = [
            [{"role": "user", "content": "Name a number near 3."}, {"role": "assistant", "content": "Sure! 4."}],
            [{"role": "user", "content": "Name a number near 5."}, {"role": "assistant", "content": "35 maybe"}],
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a number near 11."},
                {"role": "assistant", "content": "Sure! 12, or 10."},
            ],
        ]
        input_ids = [tokenizer.encode_chat(c) for c in conversations]
        model = AutoModelForSequenceClassification.from_pretrained(trained, dtype=torch.float32)
        model.eval()
        pad, width = model.config.pad_token_id, max(map(len, input_ids))
        batch = torch.tensor([ids + [pad] * (width - len(ids)) for ids in input_ids])
        with torch.no_grad():
            logits = model(batch, attention_mask=(batch != pad).long()).logits
        golden = {
            "flags": TRAINED_REWARD_FLAGS,
            "conversations": conversations,
            "input_ids": input_ids,
            "rewards": logits[:, 0].tolist(),
        }
    (out / "golden.json").write_text(json.dumps(golden))
    print(name, sorted(p.name for p in out.iterdir()), golden["rewards"])


# SmolLM2-Instruct's chat template, as its tokenizer_config.json holds it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are "
    "a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_conversations() -> list[list[dict]]:
    """Conversations that exercise ChatML: with and without a system message, one to three rounds, contents
    with edge whitespace, newlines, code, digits, non-Latin text and empty strings."""

    def u(text):
        return {"role": "user", "content": text}

    def a(text):
        return {"role": "assistant", "content": text}

    def s(text):
        return {"role": "system", "content": text}

    return [
        [u("What is the capital of Peru?")],
        [u("What is the capital of Peru?"), a("Lima.")],
        [s("Be brief."), u("Name a colour.")],
        [s("Be brief."), u("Name a colour."), a("Blue.")],
        [u("hi"), a("Hello! How can I help?"), u("Say a word.")],
        [s("You answer in French."), u("hello"), a("bonjour"), u("thanks"), a("merci"), u("bye")],
        [u("  padded on both sides  "), a("  so is this  ")],
        [u("line one\nline two\n\n"), a("\nstarts with a newline")],
        [u(""), a("")],
        [u("Grüße, 你好, привет 🌍"), a("¡Hola! ça va?")],
        [u("12345 + 678 = ?"), a("13023")],
        [u("Write f."), a("def f(x):\n    return x * 2\n")],
        [s("A system message alone.")],
        [a("An assistant message first.")],
        [s(""), u("An empty system message.")],
        [u("tabs\tand\ttabs"), a("\t")],
        [u("word " * 40), a("reply " * 30)],
        [u("!!! ??? ... ;;; --- ***"), a("(╯°□°)╯︵ ┻━┻")],
        [u("assistant"), a("user")],
        [s("One."), u("Two?"), a("Three."), u("Four?")],
        [s("first system"), s("second system"), u("which one?")],
        [u("'single' and \"double\" quotes, {braces} and [brackets]")],
        [u("trailing spaces   "), a("trailing newline\n")],
        [u("a"), a("b"), u("c"), a("d"), u("e"), a("f")],
    ]


def make_chatml(name: str):
    """A byte-level BPE with GPT-2's pre-tokenizer and SmolLM2's special tokens (ids 0-2: <|endoftext|>,
    <|im_start|>, <|im_end|>), SmolLM2's chat template, and the template's ids of every conversation."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    conversations = chatml_conversations()
    texts = [m["content"] for c in conversations for m in c] * 5 + [
        "system user assistant You are a helpful AI assistant"
    ]
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "add_prefix_space": False,
                "chat_template": SMOLLM2_TEMPLATE,
            },
            indent=2,
        )
    )
    hf = PreTrainedTokenizerFast.from_pretrained(out)
    golden = {"conversations": conversations, "without_generation_prompt": [], "with_generation_prompt": []}
    for conversation in conversations:
        for flag, key in ((False, "without_generation_prompt"), (True, "with_generation_prompt")):
            ids = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=flag, return_dict=False)
            golden[key].append(list(ids))
    (out / "golden.json").write_text(json.dumps(golden, ensure_ascii=False))
    print(name, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    names = sys.argv[1:] or [
        "tiny-llama-untied-sharded",
        "tiny-llama-tied",
        "tiny-reward-llama",
        "tiny-chatml",
        "trained-reward",
    ]
    if "tiny-llama-untied-sharded" in names:
        # untied, explicit head_dim (24 != 64/4), sharded, the config as recent transformers writes it
        make(
            "tiny-llama-untied-sharded",
            classic_config=False,
            max_shard_size="200KB",
            head_dim=24,
            tie_word_embeddings=False,
        )
    if "tiny-llama-tied" in names:
        # tied (Llama 3.2 style), head_dim implied, one file, the classic config form
        make("tiny-llama-tied", classic_config=True, max_shard_size="10GB", tie_word_embeddings=True)
    if "tiny-reward-llama" in names:
        # a reward model, with the tokenizer of the lm-eval fixture (tools/make_lm_eval_golden.py)
        make_reward("tiny-reward-llama", FIXTURES / "lm-eval-llama" / "model")
    if "tiny-chatml" in names:
        make_chatml("tiny-chatml")
    if "trained-reward" in names:
        make_trained_reward("trained-reward", FIXTURES / "lm-eval-llama" / "model")
