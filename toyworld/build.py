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

from qadapter_min.model import ModelArgs, Transformer
from qadapter_min.tokenizer import Tokenizer, train_llama3_style_tokenizer
from qadapter_min.weights import init_random_weights, ours_to_checkpoint_name, write_config
from toyworld import MODEL_DIR, WORLD_DIR
from toyworld.world import PREFERENCE_SKILLS, PREFIX, PREFIX_RATE_IN_PRETRAINING, SKILLS, make_task

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
