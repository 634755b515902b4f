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
    toyworld/world.py     the skills, the words and facts they ask about, and the preference
    toyworld/build.py     makes all of the above (python -m toyworld.build, about 3 minutes on 2 cores)
    toyworld/report.py    the table train.py prints after a run on this model
    toyworld/seeds.py     that run over seeds 1-5, Q-Adapter and DPO (python -m toyworld.seeds)
    toyworld/baselines.py Q-Adapter, DPO, SFT and Replay in one table (python -m toyworld.baselines)

The qadapter_min package knows nothing of this world. A bare `python train.py` (no --model, no --data)
runs it with `train_flags()`, a bare `python evaluate.py` measures that run's adapter with
`evaluate_flags()`: each script hands its flags to `common.parse_or_default`, the one place that does this.
"""

import os
from pathlib import Path

WORLD_DIR = Path(__file__).resolve().parent
MODEL_DIR = WORLD_DIR / "model"


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
    paths = ["--model", MODEL_DIR, "--data", WORLD_DIR / "train.jsonl", "--eval_data", WORLD_DIR / "test.jsonl"]
    return [os.path.relpath(p) if isinstance(p, Path) else p for p in paths] + (
        "--batch_size 16 --micro_batch_size 4 --lr 2e-3 --max_steps 150 --max_len 128 --log_every 10 "
        "--lora_targets q_proj k_proj"
    ).split()


def evaluate_flags() -> list[str]:
    """evaluate.py's flags for this world: the adapter a bare train.py wrote to out/, on the held-out pairs."""
    return [
        "--model",
        os.path.relpath(MODEL_DIR),
        "--adapter",
        "out",
        "--pairs",
        os.path.relpath(WORLD_DIR / "test.jsonl"),
    ]


def is_world_model(model_dir) -> bool:
    """True for this world's model directory, however the path to it is written."""
    return Path(model_dir).resolve() == MODEL_DIR
