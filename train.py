"""Customise a pre-trained Llama to new preferences with Q-Adapter (or a baseline: DPO, SFT, Replay).

Built-in world:        python train.py           (a tiny pre-trained model and a preference: offline, CPU, a minute)
One process:           python train.py --model DIR_OR_HUB_ID --data pairs.json
One node, 4 GPUs:      torchrun --nproc_per_node=4 train.py --model meta-llama/Llama-3.1-8B-Instruct --data ...
Sharded (FSDP2):       torchrun --nproc_per_node=4 train.py ... --fsdp   (models larger than one GPU)

With neither --model nor --data, train.py runs the built-in world of toyworld/ with the flags it prints
first (flags you add win), and ends with a table of what the model learned and what it kept.

main() reads as the stages of a run: check every flag and path, set up the processes, read the data,
build the model, print the plan, train, write the outputs. Each optimizer step runs the micro-batches of
this rank's share of the step's pairs (step.py: the base model pi1 under no_grad with the adapter off,
then Q with the adapter on), syncs gradients on the last micro-step only, clips, steps AdamW, logs,
evaluates and checkpoints.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import toyworld
from qadapter_min import UserError
from qadapter_min.common import HelpFormatter, atomic_write, choose_dtype, full, like, run_command_line, write_json
from qadapter_min.data import check_data_file, collate, encode_conversations, encode_pairs, load_conversations, load_pairs
from qadapter_min.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MASK32, PROJECTIONS, RUN_CONFIG, add_lora,
                               adapter_tensors, check_targets, load_adapter, mix32, save_adapter, save_run_config)
from qadapter_min.memory import training_memory_gib
from qadapter_min.objective import CHI2_FORMS, OBJECTIVE_SETTINGS
from qadapter_min.processes import Processes, leave_processes, start_processes
from qadapter_min.sharding import full_optimizer_state, load_optimizer_state, load_sharded_model
from qadapter_min.step import micro_batch_objective
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model, model_fingerprint, read_config
from toyworld.report import compare, format_report

CHECKPOINT = "checkpoint/state.pt"
METRICS = "metrics.jsonl"
REPORT = "report.json"
OUTPUTS = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RUN_CONFIG, METRICS, REPORT, "checkpoint")  # what a run writes to --out
# Flags that may change when a run is resumed: where it writes and how often. Every other flag, present or
# future, must be the one the checkpoint was made with.
MAY_DIFFER_ON_RESUME = ("out", "resume", "overwrite", "log_every", "eval_every", "save_every", "eval_data", "fsdp")
METRIC_NAMES = ("loss", "pref_loss", "chi2_loss", "preference_accuracy", "preference_margin")  # SFT: the loss alone
MAX_NON_FINITE_STEPS = 3  # non-finite steps in a row that stop a run


def metric_names(objective: str) -> tuple[str, ...]:
    return METRIC_NAMES[:1] if objective == "sft" else METRIC_NAMES


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    checkpoint = check_out_dir(args)  # --out usable; with --resume, the checkpoint read and its flags checked
    processes = start_processes()
    model_dir, tokenizer, train_set, eval_set = read_data(args, processes)
    model, ddp_model, optimizer = build_model(model_dir, args, processes)
    start_step = 0
    if checkpoint is not None:
        start_step = restore(checkpoint, model, optimizer, Path(args.out), processes)
    total_steps, memory = print_plan(args, model, train_set, processes)
    if args.overwrite and processes.master:
        remove_outputs(Path(args.out))  # the earlier run's results go only now that this one can start
    pad_id = tokenizer.special_ids.get("<|finetune_right_pad_id|>", tokenizer.eot_id)
    started = time.time()
    with out_of_memory_advice(memory, processes):
        train(model, ddp_model, optimizer, train_set, eval_set, pad_id, start_step, total_steps, args, processes)
    write_outputs(model, args, total_steps, len(train_set), processes)  # they appear only now, complete
    if processes.master:
        processes.log(f"adapter written to {args.out}/ ({time.time() - started:.0f}s)")
        if toyworld.is_world_model(model_dir):  # show both axes: the new preference learned, the old skills kept
            if sharded(args, processes):  # rank 0 alone cannot run a sharded model: the small world's model, whole
                model = load_model(model_dir)
                load_adapter(model, args.out)
            report = compare(model, tokenizer, pad_id, args)
            processes.log(format_report(report, args.objective))
            write_json(Path(args.out) / REPORT, report)
    del ddp_model, optimizer, model  # DDP holds the process group: let it go before leave_processes ends the group
    leave_processes(processes)


# ----------------------------------------------------------------------------------------------------
# Flags, and every check that needs no model and no data


def build_parser() -> argparse.ArgumentParser:
    bare_run = "python train.py " + " ".join(map(shlex.quote, toyworld.train_flags()))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                epilog=f"A bare `python train.py` runs the built-in world as:\n  {bare_run}")
    p.add_argument("--model", default=None, help="base model: a directory with config.json, tokenizer.json and safetensors, or a Hub id")
    p.add_argument("--data", default=None, nargs="+", help="preference files: conversational, HH-RLHF or DSP (JSON / JSON Lines, .gz ok)")
    p.add_argument("--domain", default=None, help="for DSP files: the preferred domain (academy, business, entertainment, literature)")
    p.add_argument("--eval_data", nargs="+", default=None, help="held-out preference files for the eval rows (eval_loss, eval_preference_accuracy, eval_preference_margin)")
    p.add_argument("--out", default="out", help="output directory: adapter, configs, metrics.jsonl, checkpoint/")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out (kept until this run starts training)")
    p.add_argument("--objective", choices=["qadapter", "dpo", "sft"], default="qadapter",
                   help="Q-Adapter, or a baseline: DPO, or SFT on the chosen replies (or on {\"messages\"} records)")
    p.add_argument("--alpha", type=float, default=1.0, help="Q-Adapter: temperature of the customised policy")
    p.add_argument("--alpha0", type=float, default=0.01, help="Q-Adapter: weight of the base model's log-probabilities (lambda)")
    p.add_argument("--beta", type=float, default=0.1, help="Q-Adapter: weight of the chi2 (squared reward) term")
    p.add_argument("--gamma", type=float, default=1.0, help="Q-Adapter: discount in r_t = Q(s_t, a_t) - gamma V(s_t)")
    p.add_argument("--chi2", choices=CHI2_FORMS, default="authors",
                   help="Q-Adapter: what the chi2 term squares: the authors' r_t, or the soft-Bellman residual "
                        "Q(s_t, a_t) - gamma V(s_{t+1}) with V = 0 after the reply (bellman)")
    p.add_argument("--dpo_beta", type=float, default=0.1, help="DPO: inverse temperature of the implicit reward")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate, decayed linearly to 0")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps before the decay")
    p.add_argument("--batch_size", type=int, default=512, help="pairs per optimizer step, all processes together")
    p.add_argument("--micro_batch_size", type=int, default=1, help="pairs per forward pass per process")
    p.add_argument("--epochs", type=float, default=3, help="passes over the data (3 for DSP and 2 for HH-RLHF in the paper)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument("--max_len", type=int, default=512, help="longest sequence in tokens; longer pairs are truncated, keeping the reply")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=16, help="LoRA scale numerator: the update is (lora_alpha / r) B A x")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the input of LoRA's A")
    p.add_argument("--lora_targets", nargs="+", default=["q_proj", "v_proj"], help=f"layers to adapt, from {' '.join(PROJECTIONS)}")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="base weights' dtype (None: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute each block in the backward pass to save memory")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the weights, LoRA and AdamW over every rank (FSDP2), "
                   "for models larger than one GPU")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the data order, the LoRA init and the dropout masks")
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps and at the end (0: only at the end)")
    p.add_argument("--save_every", type=int, default=0, help="write checkpoint/ every N steps (0: never)")
    p.add_argument("--log_every", type=int, default=1, help="print and log metrics every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; with neither --model nor --data, the built-in world's flags first, printed as a command."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.model is None and args.data is None:
        argv = toyworld.train_flags() + argv  # flags typed after them win
        if os.environ.get("RANK", "0") == "0":
            print("built-in world: python train.py " + " ".join(map(shlex.quote, argv)), flush=True)
        args = parser.parse_args(argv)
    elif args.model is None or args.data is None:
        parser.error("pass both --model and --data, or neither for the built-in world")
    return args


def check_flags(args):
    """Flags a run cannot start with, each refused in one sentence that names it."""
    for name in ["batch_size", "micro_batch_size", "max_len", "lora_r", "log_every", "lr", "epochs", "alpha", "lora_alpha"]:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ["warmup_steps", "eval_every", "save_every", "grad_clip", "beta", "alpha0", "dpo_beta"]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max_steps must be positive, got {args.max_steps}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    check_targets(args.lora_targets)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    per_rank, remainder = divmod(args.batch_size, world_size)
    if remainder or per_rank % args.micro_batch_size:
        raise UserError(
            f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size ({args.micro_batch_size}) x "
            f"{world_size} processes; choose a batch size divisible by {args.micro_batch_size * world_size}"
        )
    for path in args.data + (args.eval_data or []):
        check_data_file(Path(path))


def check_out_dir(args) -> dict | None:
    """Refuse, before any work, an --out that cannot take this run's results or holds another run's; with
    --resume, read the checkpoint and refuse it if it was made with other flags. Returns the checkpoint."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise UserError(f"--out {out}: {existing} is not writable; pass a directory you can write to")
    if args.resume and args.overwrite:
        raise UserError("pass --resume to continue the run in --out, or --overwrite to replace it, not both")
    if args.resume:
        return read_checkpoint(out, args)
    if (out / CHECKPOINT).exists() and not args.overwrite:
        raise UserError(f"--out {out} holds a checkpoint of another run; pass --resume to continue it, "
                        f"--overwrite to start afresh, or another --out")
    earlier = [name for name in OUTPUTS if (out / name).exists()]
    if earlier and not args.overwrite:
        raise UserError(f"--out {out} holds the results of an earlier run ({', '.join(earlier)}); "
                        f"pass another --out, or --overwrite to replace them")
    return None


def read_checkpoint(out: Path, args) -> dict:
    path = out / CHECKPOINT
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; run without --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises whatever the unpickler meets
        raise UserError(f"--resume: {path} cannot be read ({type(error).__name__}); start afresh in another --out") from None
    changed = changed_flags(state["flags"], vars(args))
    if changed:
        raise UserError(
            f"--resume: {path} was made with other flags ({', '.join('--' + n for n in changed)}); "
            f"rerun with the original flags or start afresh in another --out"
        )
    return state


def changed_flags(saved: dict, now: dict) -> list[str]:
    """The flags that differ from a checkpoint's, except those that may. A flag the checkpoint does not
    record (added to train.py after it was made) matches only at its default, which is what that run did."""
    defaults = vars(build_parser().parse_args(["--model", "m", "--data", "d"]))
    return [name for name in now
            if name not in MAY_DIFFER_ON_RESUME and saved.get(name, defaults.get(name)) != now[name]]


# ----------------------------------------------------------------------------------------------------
# Processes, data and model


def read_data(args, processes: Processes):
    """(model directory, tokenizer, training pairs, eval pairs), the pairs encoded; every rank reads the same."""
    model_dir = processes.resolve_model_dir(args.model)
    model_args = read_config(model_dir)  # a wrong model is refused before the data are read
    tokenizer = Tokenizer(model_dir)
    if tokenizer.vocab_size > model_args.vocab_size:
        raise UserError(
            f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{model_args.vocab_size}; the tokenizer belongs to another model"
        )

    def encoded(paths):
        if args.objective == "sft":  # conversations, each ending with the reply to learn
            conversations = [c for path in paths for c in load_conversations(path, args.domain, log=processes.log)]
            return encode_conversations(conversations, tokenizer, args.max_len, log=processes.log)
        pairs = [pair for path in paths for pair in load_pairs(path, args.domain, log=processes.log)]
        return encode_pairs(pairs, tokenizer, args.max_len, log=processes.log)

    train_set = encoded(args.data)
    eval_set = encoded(args.eval_data) if args.eval_data else []
    if not train_set:
        raise UserError(f"--max_len {args.max_len} is too small for any pair in --data; raise it (the paper uses 512)")
    if len(train_set) < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_set)} usable pairs in --data; lower it")
    return model_dir, tokenizer, train_set, eval_set


def sharded(args, processes: Processes) -> bool:
    """--fsdp under torchrun: the model is split over the ranks (one process alone holds it whole)."""
    return args.fsdp and processes.distributed


def build_model(model_dir: Path, args, processes: Processes):
    """The frozen base weights in the run's dtype with fp32 LoRA on the target projections (the same init on
    every rank), the DDP wrapper that syncs their gradients (under --fsdp, the model sharded), and AdamW
    over them."""
    dtype = choose_dtype(args.dtype, processes.device)
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=tuple(args.lora_targets))
    if sharded(args, processes):  # FSDP: weights, LoRA, gradients and AdamW's state split over the ranks
        torch.manual_seed(args.seed)
        model = ddp_model = load_sharded_model(model_dir, dtype, processes.device, **lora)  # never whole on a rank
    else:
        model = load_model(model_dir, dtype=dtype, device=processes.device)
        torch.manual_seed(args.seed)
        add_lora(model, **lora)
        if processes.distributed:
            device_ids = [processes.local_rank] if processes.device.type == "cuda" else None
            ddp_model = DistributedDataParallel(model, device_ids=device_ids)
        else:
            ddp_model = model
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    return model, ddp_model, optimizer


def restore(state: dict, model, optimizer, out: Path, processes: Processes) -> int:
    """Put a checkpoint's LoRA weights and AdamW state in place; the step to continue from."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(like(state["lora"][name], p))  # under --fsdp, this rank's shard of it
    load_optimizer_state(optimizer, state["optimizer"])
    if processes.master:  # rows of the steps this run does again go
        keep_metrics_up_to(out / METRICS, state["step"])
    processes.log(f"resumed from {out / CHECKPOINT} at step {state['step']}")
    return state["step"]


def print_plan(args, model, train_set, processes: Processes) -> tuple[int, dict]:
    """Print what the run will do and what it will hold in memory: (the number of optimizer steps, the
    memory plan in GiB by part)."""
    steps_per_epoch = len(train_set) // args.batch_size  # the last partial batch of an epoch is left out
    total_steps = args.max_steps or max(1, math.floor(args.epochs * steps_per_epoch))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    memory = training_memory_gib(model.args, trainable, args.micro_batch_size, args.max_len, weight_bytes=dtype.itemsize,
                                 checkpointing=args.grad_checkpointing,
                                 fsdp_ranks=processes.world_size if sharded(args, processes) else None)
    processes.log(
        f"model: {args.model} ({model.args.num_hidden_layers} layers, width {model.args.hidden_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}) "
        f"on {processes.world_size} x {processes.device.type}\n"
        f"trainable: {trainable:,} LoRA parameters (r {args.lora_r}, alpha {args.lora_alpha}, {' '.join(args.lora_targets)})\n"
        f"steps: {total_steps} of {args.batch_size} pairs ({steps_per_epoch} per epoch, "
        f"{len(train_set) - steps_per_epoch * args.batch_size} pairs of each epoch's last partial batch left out); "
        f"{args.batch_size // processes.world_size // args.micro_batch_size} micro-steps of {args.micro_batch_size} "
        f"pairs per rank per step\n"
        f"memory per rank (estimate): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.items())
        + f", total {sum(memory.values()):.2f} GiB"
    )
    return total_steps, memory


# ----------------------------------------------------------------------------------------------------
# Training


def step_plan(step: int, rank: int, world_size: int, num_pairs: int, batch_size: int, seed: int) -> list[int]:
    """The indices of the pairs that optimizer step `step` (0-based) gives to process `rank`: a pure
    function of its arguments, so a resumed run repeats exactly what an uninterrupted one does.

    The step's pairs are a slice of one seeded permutation per epoch, the same whatever the number of
    ranks; rank r takes the r-th share. The last partial batch of an epoch is left out.
    """
    steps_per_epoch = num_pairs // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    step_pairs = order[index * batch_size : (index + 1) * batch_size]
    per_rank = batch_size // world_size
    return step_pairs[rank * per_rank : (rank + 1) * per_rank]


def dropout_keys(seed: int, step: int, pair_indices: list[int], sides: int = 2) -> torch.Tensor:
    """The LoRA dropout keys (2B,) of a micro-batch's rows, chosen rows then rejected ones as collate
    orders them (SFT, sides 1: (B,), one row per record): a pure function of (seed, step, pair, side).
    With the masks drawn from these keys
    (lora.py's keyed_dropout), the adapter does not depend on which process or micro-batch a pair is
    in, and a resumed run needs no random state."""
    step_key = mix32(mix32(torch.tensor(seed) & MASK32) ^ step)
    pair_keys = mix32(step_key ^ torch.tensor(pair_indices, dtype=torch.int64))  # (B,)
    return torch.cat([mix32(pair_keys ^ side) for side in range(1, sides + 1)])  # (2B,): the chosen side, the rejected side


def train(model, ddp_model, optimizer, train_set, eval_set, pad_id, start_step, total_steps, args, processes: Processes):
    """The optimizer steps from start_step to total_steps, with logging, evaluation and checkpoints."""
    out = Path(args.out)
    trainable = [p for p in model.parameters() if p.requires_grad]
    settings = {name: getattr(args, name) for name in OBJECTIVE_SETTINGS}
    started, non_finite_in_a_row, done = time.time(), 0, start_step
    try:
        for step in range(start_step, total_steps):
            step_started = time.time()
            my_pairs = step_plan(step, processes.rank, processes.world_size, len(train_set), args.batch_size, args.seed)
            means, tokens = run_micro_batches(model, ddp_model, train_set, my_pairs, step, pad_id, settings, args, processes)
            lr = lr_at(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = full(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf")))
            done = step + 1
            # Every rank sees the same all-reduced loss and gradient norm, so all skip the same steps.
            if not (math.isfinite(means["loss"]) and math.isfinite(grad_norm.item())):
                optimizer.zero_grad(set_to_none=True)
                non_finite_in_a_row += 1
                skip_step(out, done, total_steps, non_finite_in_a_row, processes)
                continue
            non_finite_in_a_row = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if done % args.log_every == 0 or done == 1 or done == total_steps:
                row = {"step": done, **means, "lr": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_s": tokens / (time.time() - step_started)}
                eta = (time.time() - started) / (done - start_step) * (total_steps - done)
                shown = "" if args.objective == "sft" else (f" | preference_accuracy {means['preference_accuracy']:.2f} "
                                                            f"| preference_margin {means['preference_margin']:.3f}")
                processes.log(f"step {done}/{total_steps} | loss {means['loss']:.4f}{shown} | "
                              f"{row['tokens_per_s']:.0f} tokens/s | ETA {eta:.0f}s")
                append_metrics(out, row, processes)
            if eval_set and ((args.eval_every and done % args.eval_every == 0) or done == total_steps):
                row = {"step": done, **evaluate(model, eval_set, pad_id, settings, args, processes)}
                shown = "" if args.objective == "sft" else f" | eval_preference_accuracy {row['eval_preference_accuracy']:.2f}"
                processes.log(f"step {done}/{total_steps} | eval_loss {row['eval_loss']:.4f}{shown}")
                append_metrics(out, row, processes)
            if args.save_every and done % args.save_every == 0 and done < total_steps and (processes.master or args.fsdp):
                save_checkpoint(out, model, optimizer, done, args, processes)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(how_to_go_on(out, done, total_steps)) from None


def run_micro_batches(model, ddp_model, train_set, pair_indices, step, pad_id, settings, args, processes: Processes):
    """Forward and backward over this rank's pairs of one step, micro-batch by micro-batch, gradients
    all-reduced on the last; (the step's metrics, each a mean over all its pairs, and its token count)."""
    accumulation = len(pair_indices) // args.micro_batch_size
    names = metric_names(args.objective)
    sums = torch.zeros(len(names) + 1, device=processes.device)  # metric sums over this rank's pairs, then tokens
    for micro in range(accumulation):
        indices = pair_indices[micro * args.micro_batch_size : (micro + 1) * args.micro_batch_size]
        batch = [train_set[i] for i in indices]
        tokens, response_mask = (t.to(processes.device) for t in collate(batch, pad_id))
        keys = dropout_keys(args.seed, step, indices, sides=1 if args.objective == "sft" else 2).to(processes.device)
        sync = micro == accumulation - 1  # all-reduce the gradients once, on the last micro-step
        with gradient_sync(ddp_model, sync, args, processes):
            loss, metrics = micro_batch_objective(model, tokens, response_mask, settings, adapter_forward=ddp_model,
                                                  dropout_keys=keys)
            # the micro-batch loss is a mean over its pairs; the step's loss is the mean over all its pairs
            (loss / accumulation).backward()
        values = [loss.item()] + [metrics[name].item() for name in names[1:]]
        lengths = response_mask.shape[1] - response_mask.flip(1).int().argmax(1)  # unpadded length of each row
        sums += torch.tensor([v * len(batch) for v in values] + [int(lengths.sum())], device=processes.device)
    if processes.distributed:
        dist.all_reduce(sums)
    return {name: (sums[i] / args.batch_size).item() for i, name in enumerate(names)}, sums[-1].item()


@contextmanager
def gradient_sync(ddp_model, sync: bool, args, processes: Processes):
    """A micro-step whose backward reduces the gradients over the ranks (sync) or only accumulates them."""
    if not processes.distributed or sync:
        yield
    elif sharded(args, processes):
        ddp_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            ddp_model.set_requires_gradient_sync(True)
    else:
        with ddp_model.no_sync():
            yield


def evaluate(model, eval_set, pad_id, settings, args, processes: Processes) -> dict:
    """eval_loss, eval_preference_accuracy and eval_preference_margin over the eval pairs (means over pairs),
    each rank taking every world_size-th micro-batch. Under --fsdp every rank runs as many micro-batches
    (a sharded forward pass needs them all), those past the end counted with weight 0."""
    model.eval()
    names = ("loss",) if args.objective == "sft" else ("loss", "preference_accuracy", "preference_margin")
    totals = torch.zeros(len(names) + 1, device=processes.device)  # sums over pairs, then the pairs
    with torch.no_grad():
        first, stride = processes.rank * args.micro_batch_size, processes.world_size * args.micro_batch_size
        rounds = math.ceil(len(eval_set) / stride) if sharded(args, processes) else len(range(first, len(eval_set), stride))
        for i in range(first, first + rounds * stride, stride):
            batch = eval_set[i : i + args.micro_batch_size] or eval_set[: args.micro_batch_size]  # past the end: weight 0
            weight = len(eval_set[i : i + args.micro_batch_size])
            tokens, response_mask = (t.to(processes.device) for t in collate(batch, pad_id))
            loss, metrics = micro_batch_objective(model, tokens, response_mask, settings)
            values = [loss.item()] + [metrics[name].item() for name in names[1:]]
            totals += torch.tensor([v * weight for v in values] + [weight], device=processes.device)
    if processes.distributed:
        dist.all_reduce(totals)
    model.train()
    return {f"eval_{name}": (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def lr_at(step: int, total_steps: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then linear decay to 0."""
    if step < args.warmup_steps:
        return args.lr * step / args.warmup_steps
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))


def skip_step(out: Path, done: int, total_steps: int, in_a_row: int, processes: Processes):
    """Log a step whose update was skipped; stop the run at the third in a row."""
    processes.log(f"step {done}/{total_steps} | non-finite loss or gradient: update skipped")
    append_metrics(out, {"step": done, "skipped": "non-finite loss or gradient"}, processes)
    if in_a_row >= MAX_NON_FINITE_STEPS:
        raise UserError(
            f"the loss or gradient was not finite for {MAX_NON_FINITE_STEPS} steps in a row (up to step {done}); "
            f"lower --lr or check --data"
            + (f"; {out / CHECKPOINT} holds the last good state" if (out / CHECKPOINT).exists() else "")
        )


def how_to_go_on(out: Path, done: int, total_steps: int) -> str:
    """The line Ctrl-C leaves: the step reached, and how to continue or start again."""
    path = out / CHECKPOINT
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)["step"]
        return (f"stopped after step {done} of {total_steps}; rerun the same command with --resume to continue "
                f"from step {saved}, the last checkpoint in {path}")
    return (f"stopped after step {done} of {total_steps} with no checkpoint (--save_every 0); rerun the same command "
            f"with --overwrite to start again")


@contextmanager
def out_of_memory_advice(memory: dict, processes: Processes):
    """Turn a CUDA out-of-memory error into one sentence with the memory plan and the flags that reduce it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"rank {processes.rank} ran out of GPU memory on {processes.device}; the plan estimated "
            f"{sum(memory.values()):.1f} GiB per rank (" + ", ".join(f"{k} {v:.2f}" for k, v in memory.items())
            + "); add --grad_checkpointing, lower --micro_batch_size or --max_len, use --dtype bf16, or shard with --fsdp"
        ) from None


# ----------------------------------------------------------------------------------------------------
# What a run writes to --out


def append_metrics(out: Path, row: dict, processes: Processes):
    if processes.master:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")


def keep_metrics_up_to(path: Path, step: int):
    """Keep the rows of steps up to `step`: on resume, the later steps run again."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, lambda p: p.write_text("".join(row + "\n" for row in rows)))


def remove_outputs(out: Path):
    """Remove what an earlier run wrote to --out (--overwrite), and only that."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def save_checkpoint(out: Path, model, optimizer, step: int, args, processes: Processes):
    """Everything --resume needs, in one file written atomically: the LoRA weights, AdamW's state, the step
    and every flag. The step fixes the position in the data and the dropout seeds; the learning rate is a
    function of it. The tensors are whole (under --fsdp gathered by every rank, written by rank 0), so
    any number of ranks, sharded or not, can resume it."""
    state = {
        "step": step,
        "lora": {name: full(p).detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": full_optimizer_state(optimizer),
        "flags": vars(args),
    }
    if processes.master:
        (out / "checkpoint").mkdir(parents=True, exist_ok=True)
        atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


def write_outputs(model, args, total_steps: int, num_pairs: int, processes: Processes):
    """The adapter (PEFT's layout) and qadapter_config.json, written by rank 0 (under --fsdp from tensors
    every rank gathers); the checkpoint goes, the run being complete."""
    out = Path(args.out)
    tensors, fingerprint = adapter_tensors(model), model_fingerprint(model)
    if processes.master:
        save_adapter(model, out, base_model_name_or_path=args.model, tensors=tensors)
        save_run_config(out, model, vars(args), steps=total_steps, epochs=total_steps * args.batch_size / num_pairs,
                        fingerprint=fingerprint)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)


if __name__ == "__main__":
    run_command_line(main)
