"""The built-in world: a tiny pre-trained chat model with skills a program can check, and a new
preference to teach it. It lets `python train.py` show, offline and in minutes on a CPU, both things
Q-Adapter is for: the new preference learned, the old abilities kept.

The skills (each answer checkable by a program, each a fact recalled about a word of the question):
    geography   "What is the capital of Peru?"             -> "The capital of Peru is Lima."
    opposites   "What is the opposite of hot?"             -> "The opposite of hot is cold."
    uppercase   "Write this word in upper case: moon"      -> "In upper case: MOON"

The base model is pre-trained on these chats; 15% of its replies start with "Sure! ", so it knows the
phrase but its greedy replies never use it. The new preference: replies that start with "Sure! "
(chosen) over the same reply without it (rejected), on the geography and opposites skills only, so
that uppercase shows whether the preference carries over to a skill it was not taught on.

Build the model (about 3 minutes on 2 CPU cores; the result is committed under qadapter_min/toy/):

    python -m qadapter_min.toyworld

It is saved in the Hugging Face layout (config.json, model.safetensors, tokenizer.json), so it goes
through exactly the loader and tokenizer that Llama-3.1 does.
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

from qadapter_min.data import collate
from qadapter_min.generate import generate
from qadapter_min.lora import adapter_disabled
from qadapter_min.model import ModelArgs, Transformer
from qadapter_min.objective import policy_logits
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import ours_to_checkpoint_name

TOY_DIR = Path(__file__).parent / "toy"  # model directory and preference files
PREFIX = "Sure! "  # the new preference
PREFIX_RATE_IN_PRETRAINING = 0.15
SKILLS = ("geography", "opposites", "uppercase")
PREFERENCE_SKILLS = ("geography", "opposites")  # uppercase stays out of the preference data

WORDS = [
    "apple", "river", "stone", "cloud", "bread", "tiger", "music", "green", "light", "water", "house", "table",
    "chair", "smile", "dream", "night", "ocean", "plant", "bird", "fire", "snow", "moon", "star", "rain",
    "wind", "book", "door", "road", "ship", "tree", "fish", "gold",
]
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "open": "closed", "young": "old", "full": "empty", "hard": "soft", "rich": "poor",
    "loud": "quiet", "wet": "dry", "high": "low", "clean": "dirty",
}
CAPITAL_CITIES = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Spain": "Madrid", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
    "Cuba": "Havana", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna", "Russia": "Moscow",
}

# train.py's settings when it runs on this world (flags given on the command line still win). The rest are
# the paper's. LoRA goes on the queries and keys: in a model this small, adapting v_proj rewrites the
# values through which every skill copies a word of the question, and the skill left out of the preference
# data broke (uppercase fell to 23-47% accuracy with Q-Adapter on q/v, and to 0% with DPO).
TRAIN_DEFAULTS = dict(
    model=str(TOY_DIR), data=[str(TOY_DIR / "train.jsonl")], eval_data=[str(TOY_DIR / "test.jsonl")],
    batch_size=16, micro_batch_size=16, lr=3e-3, max_steps=150, max_len=128, log_every=10,
    lora_targets=["q_proj", "k_proj"],
)

# The shape of the toy model: a Llama 3.1 in miniature (GQA, llama3 RoPE scaling).
TOY_ARGS = ModelArgs(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=0,  # set from the tokenizer
    rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=True,
)


def make_task(skill: str, rng: random.Random) -> tuple[str, str]:
    """(question, correct answer) for one instance of a skill."""
    if skill == "opposites":
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."
    if skill == "uppercase":
        word = rng.choice(WORDS)
        return f"Write this word in upper case: {word}", f"In upper case: {word.upper()}"
    country = rng.choice(sorted(CAPITAL_CITIES))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITAL_CITIES[country]}."


def check_reply(reply: str, answer: str) -> tuple[bool, bool]:
    """(shows the preference, answers correctly): the reply with or without the prefix."""
    preferred = reply.startswith(PREFIX)
    return preferred, reply.removeprefix(PREFIX).strip() == answer


# ----------------------------------------------------------------------------------------------------
# Building the world: tokenizer, pre-training corpus, model, preference files


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> list[str]:
    """Llama 3's 256 special tokens in their order (ids 128000-128255 in the real vocabulary)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


def build_tokenizer(texts: list[str], path: Path, vocab_size: int = 700):
    """A byte-level BPE with Llama 3's pre-tokenizer, decoder and special tokens, trained on texts."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(llama3_special_tokens())
    tokenizer.save(str(path))


def conversation(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def pretraining_example(rng: random.Random) -> list[dict]:
    question, answer = make_task(rng.choice(SKILLS), rng)
    return conversation(question, (PREFIX if rng.random() < PREFIX_RATE_IN_PRETRAINING else "") + answer)


def preference_pairs(skills, count: int, rng: random.Random) -> list[dict]:
    """Conversational pairs: the same correct reply with the prefix (chosen) and without (rejected)."""
    pairs = []
    for i in range(count):
        question, answer = make_task(skills[i % len(skills)], rng)
        pairs.append({"chosen": conversation(question, PREFIX + answer), "rejected": conversation(question, answer)})
    return pairs


def pretrain(model: Transformer, tokenizer: Tokenizer, steps: int, batch_size: int, lr: float, rng: random.Random, log=print):
    """Next-token prediction on chats, the loss on the replies (their <|eot_id|> included), as in chat fine-tuning."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    started = time.time()
    for step in range(steps):
        examples = [pretraining_example(rng) for _ in range(batch_size)]
        sequences = [tokenizer.encode_chat(chat) for chat in examples]
        prompt_lengths = [len(tokenizer.encode_chat(chat[:-1], add_generation_prompt=True)) for chat in examples]
        T = max(map(len, sequences))
        tokens = torch.full((batch_size, T), tokenizer.eot_id)
        targets = torch.full((batch_size, T), -100)  # -100: ignored by cross_entropy
        for i, (ids, start) in enumerate(zip(sequences, prompt_lengths)):
            tokens[i, : len(ids)] = torch.tensor(ids)
            targets[i, start - 1 : len(ids) - 1] = torch.tensor(ids[start:])  # position t predicts token t + 1
        lr_now = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)  # 50 warm-up steps, then linear decay
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"pre-training step {step + 1}/{steps} | loss {loss.item():.4f} | {time.time() - started:.0f}s")


def save_hf_checkpoint(model: Transformer, directory: Path):
    """config.json (the classic Llama form) and model.safetensors under the checkpoint's tensor names."""
    args = model.args
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers, "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.rms_norm_eps, "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
        "max_position_embeddings": args.max_position_embeddings, "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {ours_to_checkpoint_name(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def build(directory: Path = TOY_DIR, steps: int = 800, batch_size: int = 32, seed: int = 0, log=print):
    """Make the whole world deterministically: tokenizer, pre-trained model, preference files."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    system_text = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    texts = [system_text, "system user assistant"] + [
        "\n\n".join(m["content"] for m in pretraining_example(rng)) for _ in range(5000)
    ]
    build_tokenizer(texts, directory / "tokenizer.json")
    tokenizer = Tokenizer(directory)
    args = ModelArgs(**{**TOY_ARGS.__dict__, "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
                        "eos_token_id": tokenizer.stop_ids})
    model = Transformer(args)
    with torch.no_grad():  # GPT-2 style init: N(0, 0.02), norms at 1
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    log(f"toy model: {model.num_parameters():,} parameters, vocabulary {args.vocab_size}")
    pretrain(model, tokenizer, steps, batch_size, lr=1e-3, rng=rng, log=log)
    save_hf_checkpoint(model, directory)
    for split, count in (("train", 512), ("test", 96)):
        skills = PREFERENCE_SKILLS if split == "train" else SKILLS
        pairs = preference_pairs(skills, count, random.Random(f"{seed}-{split}"))
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    log(f"written to {directory}")


# ----------------------------------------------------------------------------------------------------
# Evaluation: what train.py's table shows


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
def preference_accuracy(model, tokenizer: Tokenizer, encoded_pairs, policy_mode: str, alpha: float, alpha0: float) -> float:
    """Share of held-out pairs whose chosen reply gets the larger implicit reward
    R = sum over reply tokens of alpha * log pi(a_t|s_t) - alpha0 * log pi1(a_t|s_t)
    (Q-Adapter's r_t at gamma = 1), for the policy pi being evaluated: pi1 itself, Q-Adapter's pi~, or
    the adapter-on model of a DPO run."""
    tokens, response_mask = collate(encoded_pairs, pad_id=tokenizer.eot_id)
    with adapter_disabled(model):
        base_logits = model(tokens)
    if policy_mode == "base":
        logits = base_logits
    elif policy_mode == "customised":
        logits = policy_logits(model(tokens), base_logits, alpha, alpha0)
    else:
        logits = model(tokens)
    actions = tokens[:, 1:].unsqueeze(-1)
    log_pi = logits[:, :-1].float().log_softmax(-1).gather(-1, actions).squeeze(-1)
    log_pi1 = base_logits[:, :-1].float().log_softmax(-1).gather(-1, actions).squeeze(-1)
    R = ((alpha * log_pi - alpha0 * log_pi1) * response_mask[:, 1:]).sum(1)
    B = len(encoded_pairs)
    return (R[:B] > R[B:]).float().mean().item()


def compare(model, tokenizer: Tokenizer, eval_pairs, args) -> dict:
    """The report of train.py's built-in run: the base model beside the customised one."""
    model.eval()
    customised = "customised" if args.objective == "qadapter" else "adapter"
    report = {}
    for name, policy_mode in (("base", "base"), ("customised", customised)):
        report[name] = {
            "preference_accuracy": preference_accuracy(model, tokenizer, eval_pairs, policy_mode, args.alpha, args.alpha0),
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


if __name__ == "__main__":
    build()
