"""Make the built-in world, deterministically: its tokenizer, the pre-trained model and the preference
files. The result is committed, so nobody needs to run this; it is here to show how the world was made
and to let you change it.

    python -m toyworld.build      # about 3 minutes on 2 CPU cores; rewrites toyworld/model/ and *.jsonl
"""

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from qadapter_min.model import ModelArgs, Transformer
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import CONFIG_FILE, ours_to_checkpoint_name
from toyworld import MODEL_DIR, WORLD_DIR
from toyworld.world import PREFERENCE_SKILLS, PREFIX, PREFIX_RATE_IN_PRETRAINING, SKILLS, make_task

# How a Llama-layout checkpoint is made from nothing: here for the built-in world, and for the tests' tiny
# checkpoints and bench.py's random-weight models.


def write_config(args: ModelArgs, directory: Path, rope_form: str = "classic", torch_dtype: str = "float32"):
    """config.json for ModelArgs, as the Hub writes it: the inverse of read_config. rope_form "classic"
    writes rope_theta + rope_scaling; "parameters" the newer rope_parameters dict."""
    if rope_form == "classic":
        rope = {"rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling}
    else:
        rope = {"rope_parameters": {"rope_theta": args.rope_theta, **(args.rope_scaling or {"rope_type": "default"})}}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.rms_norm_eps,
        **rope,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def init_random_weights(model: Transformer, std: float = 0.02):
    """Weights for a model trained from scratch (the built-in world) or timed (bench.py), not loaded:
    GPT-2's init, every matrix N(0, std) and every norm at 1. Draws from torch's global generator."""
    for p in model.parameters():
        p.normal_(0.0, std) if p.dim() > 1 else p.fill_(1.0)


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> list[str]:
    """Llama 3's 256 special tokens in their order (ids 128000-128255 in the real vocabulary)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


def train_llama3_style_tokenizer(texts: list[str], path: Path, vocab_size: int):
    """Write to path a tokenizer.json: byte-level BPE with Llama 3's pre-tokenizer, decoder and special
    tokens, its merges trained on texts."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(llama3_special_tokens())
    tokenizer.save(str(path))


# chats of one, two and three questions: the model holds a conversation
MULTI_TURN_WEIGHTS = (0.5, 0.3, 0.2)

# The shape of the model: a Llama 3.1 in miniature (GQA, llama3 RoPE scaling, tied embeddings).
WORLD_ARGS = ModelArgs(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=0,  # set from the tokenizer
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    tie_word_embeddings=True,
)


def conversation(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def pretraining_example(rng: random.Random) -> list[dict]:
    """A chat of one to three questions, each on a skill drawn at random, each answered correctly; 15% of
    the replies start with the prefix."""
    turns = rng.choices((1, 2, 3), weights=MULTI_TURN_WEIGHTS)[0]
    chat = []
    for _ in range(turns):
        question, answer = make_task(rng.choice(SKILLS), rng)
        chat += conversation(question, (PREFIX if rng.random() < PREFIX_RATE_IN_PRETRAINING else "") + answer)
    return chat


def preference_pairs(skills, count: int, rng: random.Random) -> list[dict]:
    """Conversational pairs: the same correct reply with the prefix (chosen) and without (rejected)."""
    pairs = []
    for i in range(count):
        question, answer = make_task(skills[i % len(skills)], rng)
        pairs.append({"chosen": conversation(question, PREFIX + answer), "rejected": conversation(question, answer)})
    return pairs


def pretrain(
    model: Transformer, tokenizer: Tokenizer, steps: int, batch_size: int, lr: float, rng: random.Random, log=print
):
    """Next-token prediction on chats, the loss on the replies (their <|eot_id|> included), as in chat fine-tuning."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    started = time.time()
    for step in range(steps):
        examples = [pretraining_example(rng) for _ in range(batch_size)]
        sequences = [tokenizer.encode_chat(chat) for chat in examples]
        T = max(map(len, sequences))
        tokens = torch.full((batch_size, T), tokenizer.eot_id)
        targets = torch.full((batch_size, T), -100)  # -100: ignored by cross_entropy
        for i, (chat, ids) in enumerate(zip(examples, sequences)):
            tokens[i, : len(ids)] = torch.tensor(ids)
            for turn in range(1, len(chat), 2):  # every assistant reply of the chat is a target
                start = len(tokenizer.encode_chat(chat[:turn], add_generation_prompt=True))
                end = len(tokenizer.encode_chat(chat[: turn + 1]))
                # position t predicts token t + 1
                targets[i, start - 1 : end - 1] = torch.tensor(ids[start:end])
        # 50 warm-up steps, then linear decay
        lr_now = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"pre-training step {step + 1}/{steps} | loss {loss.item():.4f} | {time.time() - started:.0f}s")


def save_model(model: Transformer, directory: Path):
    """config.json and model.safetensors under the checkpoint's tensor names: the Hugging Face layout."""
    write_config(model.args, directory)
    state = {ours_to_checkpoint_name(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def build(
    model_dir: Path = MODEL_DIR,
    pairs_dir: Path = WORLD_DIR,
    steps: int = 800,
    batch_size: int = 32,
    seed: int = 0,
    log=print,
):
    """Make the whole world deterministically: tokenizer, pre-trained model, preference files."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    system_text = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    texts = [system_text, "system user assistant"] + [
        "\n\n".join(m["content"] for m in pretraining_example(rng)) for _ in range(5000)
    ]
    train_llama3_style_tokenizer(texts, model_dir / "tokenizer.json", vocab_size=700)
    tokenizer = Tokenizer(model_dir)
    args = ModelArgs(
        **{
            **WORLD_ARGS.__dict__,
            "vocab_size": tokenizer.vocab_size,
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.stop_ids,
        }
    )
    model = Transformer(args)
    init_random_weights(model)
    log(f"built-in model: {model.num_parameters():,} parameters, vocabulary {args.vocab_size}")
    pretrain(model, tokenizer, steps, batch_size, lr=1e-3, rng=rng, log=log)
    save_model(model, model_dir)
    for split, count in (("train", 512), ("test", 96)):
        skills = PREFERENCE_SKILLS if split == "train" else SKILLS
        pairs = preference_pairs(skills, count, random.Random(f"{seed}-{split}"))
        (pairs_dir / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    log(f"written to {model_dir} and {pairs_dir}")


if __name__ == "__main__":
    build()
