"""The built-in world: a tiny pre-trained chat model with skills a program can check, and a new
preference to teach it. It lets a bare `python train.py` show, offline and in a minute on a CPU, both
things Q-Adapter is for: the new preference learned, the old abilities kept.

The skills (each answer checkable by a program, each a fact recalled about a word of the question):
    geography   "What is the capital of Peru?"             -> "The capital of Peru is Lima."
    opposites   "What is the opposite of hot?"             -> "The opposite of hot is cold."
    uppercase   "Write this word in upper case: moon"      -> "In upper case: MOON"

The base model is pre-trained on chats of one to three such questions (so it holds a conversation);
15% of its replies start with "Sure! ", so it knows the phrase but its greedy replies never use it.
The new preference: replies that start with "Sure! " (chosen) over the same reply without it
(rejected), on the geography and opposites skills only, so that uppercase shows whether the
preference carries over to a skill it was not taught on.

    toyworld/model/       the pre-trained model in the Hugging Face layout (config.json, model.safetensors,
                          tokenizer.json): it goes through exactly the loader and tokenizer Llama-3.1 does
    toyworld/train.jsonl  512 preference pairs (conversational format); test.jsonl: 96 held out
    toyworld/build.py     makes all of the above (python -m toyworld.build, about 3 minutes on 2 cores)
    toyworld/report.py    the table train.py prints after a run on this model
    toyworld/seeds.py     that run over seeds 1-5, Q-Adapter and DPO (python -m toyworld.seeds)
    toyworld/baselines.py Q-Adapter, DPO, SFT and Replay in one table (python -m toyworld.baselines)

The qadapter_min package knows nothing of this world; train.py runs it when given no --model and no
--data, with the flags of `train_flags()`.
"""

import os
import random
import shlex
from pathlib import Path

from qadapter_min.processes import LAUNCHED

WORLD_DIR = Path(__file__).resolve().parent
MODEL_DIR = WORLD_DIR / "model"
PREFIX = "Sure! "  # the new preference
PREFIX_RATE_IN_PRETRAINING = 0.15
SKILLS = ("geography", "opposites", "uppercase")
PREFERENCE_SKILLS = ("geography", "opposites")  # uppercase stays out of the preference data

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "bread",
    "tiger",
    "music",
    "green",
    "light",
    "water",
    "house",
    "table",
    "chair",
    "smile",
    "dream",
    "night",
    "ocean",
    "plant",
    "bird",
    "fire",
    "snow",
    "moon",
    "star",
    "rain",
    "wind",
    "book",
    "door",
    "road",
    "ship",
    "tree",
    "fish",
    "gold",
]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "strong": "weak",
    "open": "closed",
    "young": "old",
    "full": "empty",
    "hard": "soft",
    "rich": "poor",
    "loud": "quiet",
    "wet": "dry",
    "high": "low",
    "clean": "dirty",
}
CAPITAL_CITIES = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Spain": "Madrid",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Russia": "Moscow",
}


def train_flags() -> list[str]:
    """train.py's flags for this world (paths relative to the current directory); flags typed after them
    win. The objective's settings are the paper's; the rest suit a model this small, chosen so that the
    table holds for every seed (`python -m toyworld.seeds` runs seeds 1-5):
      - lr 2e-3 (the paper's 3e-4 moves a 0.9M model too little in 150 steps; at 3e-3 one seed of five
        lost 23% of the held-out skill), 150 steps of 16 pairs, replies of a few tokens (max_len 128);
      - 4 pairs per micro-batch, so that 1, 2 or 4 processes (--nproc_per_node) run it as it is;
      - LoRA on the queries and keys, not the paper's queries and values: in a model this small, adapting
        v_proj rewrites the values through which every skill copies a word of the question, and the
        skill left out of the preference data broke (uppercase fell to 23-47% accuracy with Q-Adapter
        on q/v, to 0% with DPO).
    """
    return [
        "--model",
        os.path.relpath(MODEL_DIR),
        "--data",
        os.path.relpath(WORLD_DIR / "train.jsonl"),
        "--eval_data",
        os.path.relpath(WORLD_DIR / "test.jsonl"),
        "--batch_size",
        "16",
        "--micro_batch_size",
        "4",
        "--lr",
        "2e-3",
        "--max_steps",
        "150",
        "--max_len",
        "128",
        "--log_every",
        "10",
        "--lora_targets",
        "q_proj",
        "k_proj",
    ]


def with_world_flags(argv: list[str]) -> list[str]:
    """A bare train.py's command line: this world's flags, then those typed (which win), printed as
    the command it amounts to (once, however many processes run it)."""
    typed = {flag for flag in argv if flag.startswith("--")}
    argv = [*without_flags(train_flags(), typed), *argv]  # each flag once: a typed one wins
    if os.environ.get("RANK", "0") == "0" and LAUNCHED not in os.environ:  # printed once
        print("built-in world: python train.py " + " ".join(map(shlex.quote, argv)), flush=True)
    return argv


def without_flags(argv: list[str], flags: set[str]) -> list[str]:
    """argv without the flags named (each with the values that follow it, up to the next flag)."""
    kept, dropping = [], False
    for word in argv:
        if word.startswith("--"):
            dropping = word in flags
        if not dropping:
            kept.append(word)
    return kept


def is_world_model(model_dir) -> bool:
    """True for this world's model directory, however the path to it is written."""
    return Path(model_dir).resolve() == MODEL_DIR


def make_task(skill: str, rng: random.Random) -> tuple[str, str]:
    """(question, correct answer) for one instance of a skill."""
    if skill == "opposites":
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."
    if skill == "uppercase":
        word = rng.choice(WORDS)
        return f"Write this word in upper case: {word}", f"In upper case: {word.upper()}"
    country = rng.choice(sorted(CAPITAL_CITIES))
    return (f"What is the capital of {country}?", f"The capital of {country} is {CAPITAL_CITIES[country]}.")


def check_reply(reply: str, answer: str) -> tuple[bool, bool]:
    """(shows the preference, answers correctly): the reply with or without the prefix."""
    preferred = reply.startswith(PREFIX)
    return preferred, reply.removeprefix(PREFIX).strip() == answer
