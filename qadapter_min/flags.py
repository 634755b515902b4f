"""train.py's command line: its flags, with their defaults and help, and every check of them that
needs no model and no data (refused in one sentence that names the flag, before any work).

The objective's defaults are objective.Objective's, written there once; a bare `python train.py` runs
the flags the caller passes as `world` (train.py passes the built-in world's), printed first.
"""

import argparse
import os
import sys
from pathlib import Path

from qadapter_min import UserError, tracking
from qadapter_min.common import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Parser,
    add_compile_flag,
    checked,
    parse_or_default,
)
from qadapter_min.data import check_data_file
from qadapter_min.lora import PROJECTIONS, check_targets
from qadapter_min.objective import CHI2_FORMS, Objective
from qadapter_min.processes import add_nproc_flag

DROPOUT = checked(float, "in [0, 1)", lambda v: 0 <= v < 1)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """train.py's parser; description: its --help text (train.py's docstring)."""
    p = Parser(description)
    p.add_argument(
        "--model", help="base model: a directory with config.json, tokenizer.json and safetensors, or a Hub id"
    )
    p.add_argument(
        "--data", nargs="+", help="preference files: conversational, HH-RLHF or DSP (JSON / JSON Lines, .gz ok)"
    )
    p.add_argument(
        "--domain", help="for DSP files: the preferred domain (academy, business, entertainment, literature)"
    )
    p.add_argument(
        "--eval_data",
        nargs="+",
        help="held-out preference files for the eval rows (eval_loss, and the preference and implicit "
        "reward accuracies and margins)",
    )
    p.add_argument("--out", default="out", help="output directory: adapter, configs, metrics.jsonl, checkpoint/")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (kept until this run starts training)",
    )
    p.add_argument(
        "--objective",
        choices=["qadapter", "dpo", "sft", "rm"],
        default=Objective.name,
        help='Q-Adapter, or a baseline: DPO, or SFT on the chosen replies (or on {"messages"} '
        "records); or rm, a reward model that judges replies (a score head on the base model, "
        "written whole: reward.py); the flags marked Q-Adapter: or DPO: are refused with the "
        "other objectives",
    )
    p.add_argument(
        "--alpha", type=POSITIVE, default=Objective.alpha, help="Q-Adapter: temperature of the customised policy"
    )
    p.add_argument(
        "--alpha0",
        type=NON_NEGATIVE,
        default=Objective.alpha0,
        help="Q-Adapter: weight of the base model's log-probabilities (lambda)",
    )
    p.add_argument(
        "--beta", type=NON_NEGATIVE, default=Objective.beta, help="Q-Adapter: weight of the chi2 (squared reward) term"
    )
    p.add_argument(
        "--gamma", type=float, default=Objective.gamma, help="Q-Adapter: discount in r_t = Q(s_t, a_t) - gamma V(s_t)"
    )
    p.add_argument(
        "--chi2",
        choices=CHI2_FORMS,
        default=Objective.chi2,
        help="Q-Adapter: what the chi2 term squares: the authors' r_t, or the soft-Bellman residual "
        "Q(s_t, a_t) - gamma V(s_{t+1}) with V = 0 after the reply (bellman)",
    )
    p.add_argument(
        "--dpo_beta",
        type=NON_NEGATIVE,
        default=Objective.dpo_beta,
        help="DPO: inverse temperature of the implicit reward",
    )
    p.add_argument("--lr", type=POSITIVE, default=3e-4, help="peak AdamW learning rate, decayed linearly to 0")
    p.add_argument("--warmup_steps", type=COUNT, default=0, help="linear warm-up steps before the decay")
    p.add_argument(
        "--batch_size", type=POSITIVE_INT, default=512, help="pairs per optimizer step, all processes together"
    )
    p.add_argument("--micro_batch_size", type=POSITIVE_INT, default=1, help="pairs per forward pass per process")
    p.add_argument(
        "--epochs", type=POSITIVE, default=3, help="passes over the data (3 for DSP and 2 for HH-RLHF in the paper)"
    )
    p.add_argument("--max_steps", type=POSITIVE_INT, help="optimizer steps; overrides --epochs")
    p.add_argument(
        "--max_len",
        type=POSITIVE_INT,
        default=512,
        help="longest sequence in tokens; longer pairs are truncated, keeping the reply",
    )
    p.add_argument("--lora_r", type=POSITIVE_INT, default=8, help="LoRA rank")
    p.add_argument(
        "--lora_alpha", type=POSITIVE, default=16, help="LoRA scale numerator: the update is (lora_alpha / r) B A x"
    )
    p.add_argument("--lora_dropout", type=DROPOUT, default=0.05, help="dropout on the input of LoRA's A")
    p.add_argument(
        "--lora_targets", nargs="+", default=["q_proj", "v_proj"], help=f"layers to adapt, from {' '.join(PROJECTIONS)}"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="base weights' dtype (None: bf16 on GPU, fp32 on CPU)")
    p.add_argument(
        "--grad_checkpointing", action="store_true", help="recompute each block in the backward pass to save memory"
    )
    add_nproc_flag(p)
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with several processes, shard the weights, LoRA and AdamW over every rank (FSDP2), "
        "for models larger than one GPU",
    )
    p.add_argument(
        "--grad_clip", type=NON_NEGATIVE, default=1.0, help="clip the gradient norm to this (0: no clipping)"
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the data order, the LoRA init and the dropout masks")
    p.add_argument(
        "--eval_every", type=COUNT, default=0, help="evaluate every N steps and at the end (0: only at the end)"
    )
    p.add_argument("--save_every", type=COUNT, default=0, help="write checkpoint/ every N steps (0: never)")
    p.add_argument("--log_every", type=POSITIVE_INT, default=1, help="print and log metrics every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    p.add_argument("--wandb_project", help="log every metrics row to this Weights & Biases project (needs wandb)")
    p.add_argument("--wandb_run_name", help="with --wandb_project: the run's name")
    add_compile_flag(p, "each block's forward pass and the built-in report's decoding")
    return p


def parse_args(argv=None, description: str = "", world: list[str] = ()) -> argparse.Namespace:
    """The flags; with neither --model nor --data, the flags of `world` first, printed as a command."""
    parser, argv = build_parser(description), sys.argv[1:] if argv is None else list(argv)
    args = parse_or_default(parser, argv, ("model", "data"), list(world), "train.py")
    if args.model is None or args.data is None:
        parser.error("pass both --model and --data, or neither for the built-in world")
    return args


# The flags only one objective reads: set for another, they would change nothing (refused).
OBJECTIVE_FLAGS = {"qadapter": ("alpha", "alpha0", "beta", "gamma", "chi2"), "dpo": ("dpo_beta",)}


def check_flags(args):
    """Flags a run cannot start with, each refused in one sentence that names it."""
    default = defaults()
    for objective, names in OBJECTIVE_FLAGS.items():
        for name in names:
            if args.objective != objective and getattr(args, name) != default[name]:
                raise UserError(
                    f"--{name} is a setting of --objective {objective}, and this run trains "
                    f"--objective {args.objective}, which has no use for it; drop --{name}"
                )
    check_targets(args.lora_targets)
    tracking.check(args)
    world_size = int(os.environ.get("WORLD_SIZE", args.nproc_per_node))  # torchrun's, or ours
    per_rank, remainder = divmod(args.batch_size, world_size)
    if remainder or per_rank % args.micro_batch_size:
        raise UserError(
            f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size ({args.micro_batch_size}) x "
            f"{world_size} processes; choose a batch size divisible by {args.micro_batch_size * world_size}"
        )
    for path in args.data + (args.eval_data or []):
        check_data_file(Path(path))


def defaults() -> dict:
    """Every flag's default, by name."""
    return vars(build_parser().parse_args(["--model", "m", "--data", "d"]))
