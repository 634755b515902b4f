"""Customise a pre-trained Llama to new preferences with Q-Adapter (or the DPO baseline).

Built-in default:      python train.py           (a tiny pre-trained model and preference, offline, CPU, minutes)
One process:           python train.py --model DIR_OR_HUB_ID --data pairs.json
One node, 4 GPUs:      torchrun --nproc_per_node=4 train.py --model meta-llama/Llama-3.1-8B-Instruct --data ...

The loop, top to bottom: set up the processes, read the pairs, load the model and put LoRA on it, print
the plan, then for each optimizer step run the micro-batches of this rank's share of the step's pairs
(the base model pi1 under no_grad with the adapter off, then Q with the adapter on), sync gradients on
the last micro-step only, clip, step AdamW, log, evaluate and checkpoint.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from qadapter_min import UserError, toyworld
from qadapter_min.data import collate, encode_pairs, load_pairs
from qadapter_min.memory import training_memory_gib
from qadapter_min.lora import PROJECTIONS, adapter_disabled, add_lora, atomic_write, save_adapter
from qadapter_min.objective import dpo_loss_from_hidden, qadapter_loss_from_hidden
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model, model_fingerprint, read_config, resolve_model_dir

CHECKPOINT = "checkpoint/state.pt"
MAX_NON_FINITE_STEPS = 3  # non-finite steps in a row that stop a run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model: a directory with config.json, tokenizer.json and safetensors, or a Hub id")
    p.add_argument("--data", default=None, nargs="+", help="preference files: conversational, HH-RLHF or DSP (JSON / JSON Lines, .gz ok)")
    p.add_argument("--domain", default=None, help="for DSP files: the preferred domain (academy, business, entertainment, literature)")
    p.add_argument("--eval_data", nargs="+", default=None, help="held-out preference files for eval_loss and eval_accuracy")
    p.add_argument("--out", default="out", help="output directory: adapter, configs, metrics.jsonl, checkpoint/")
    p.add_argument("--objective", choices=["qadapter", "dpo"], default="qadapter", help="Q-Adapter, or the DPO baseline")
    p.add_argument("--alpha", type=float, default=1.0, help="Q-Adapter: temperature of the customised policy")
    p.add_argument("--alpha0", type=float, default=0.01, help="Q-Adapter: weight of the base model's log-probabilities (lambda)")
    p.add_argument("--beta", type=float, default=0.1, help="Q-Adapter: weight of the chi2 (squared reward) term")
    p.add_argument("--gamma", type=float, default=1.0, help="Q-Adapter: discount in r_t = Q(s_t, a_t) - gamma V(s_t)")
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
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="base weights' dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute each block in the backward pass to save memory")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the data order, the LoRA init and dropout")
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps and at the end (0: only at the end)")
    p.add_argument("--save_every", type=int, default=0, help="write checkpoint/ every N steps (0: never)")
    p.add_argument("--log_every", type=int, default=1, help="print and log metrics every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    args = p.parse_args(argv)
    if args.model is None and args.data is None:  # the built-in world, with settings that suit its size
        p.set_defaults(**toyworld.TRAIN_DEFAULTS)
        args = p.parse_args(argv)
        args.builtin = True
    elif args.model is None or args.data is None:
        p.error("pass both --model and --data, or neither for the built-in default")
    else:
        args.builtin = False
    return args


def check_flags(args):
    """Flags a run cannot start with, each refused in one sentence that names it."""
    positive = ["batch_size", "micro_batch_size", "max_len", "lora_r", "log_every", "lr", "epochs", "alpha", "lora_alpha"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ["warmup_steps", "eval_every", "save_every", "grad_clip", "beta", "alpha0", "dpo_beta"]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max_steps must be positive, got {args.max_steps}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")


def check_out_dir(out: Path, resume: bool):
    """Refuse, before any work, an --out that cannot take the results (so hours of training are not lost)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise UserError(f"--out {out}: {existing} is not writable; pass a directory you can write to")
    if not resume and (out / CHECKPOINT).exists():
        raise UserError(f"--out {out} holds a checkpoint of another run; pass --resume to continue it, or another --out")


def lr_at(step: int, total_steps: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then linear decay to 0."""
    if step < args.warmup_steps:
        return args.lr * step / args.warmup_steps
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    check_out_dir(Path(args.out), args.resume)

    # ---- processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is rank 0 of 1
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world_size = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master = rank == 0  # only rank 0 prints and writes
    log = print if master else (lambda *_: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    per_rank, remainder = divmod(args.batch_size, world_size)
    if remainder or per_rank % args.micro_batch_size:
        raise UserError(
            f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size ({args.micro_batch_size}) x "
            f"{world_size} processes; choose a batch size divisible by {args.micro_batch_size * world_size}"
        )
    accumulation = per_rank // args.micro_batch_size  # micro-steps per optimizer step on each rank

    if args.builtin and not (toyworld.TOY_DIR / "model.safetensors").exists():
        if master:
            toyworld.build()
        if distributed:
            dist.barrier()

    # ---- data: every rank reads and encodes the same pairs
    if master:  # rank 0 downloads a Hub model; the others then find it in the cache
        model_dir = resolve_model_dir(args.model)
    if distributed:
        dist.barrier()
    if not master:
        model_dir = resolve_model_dir(args.model)
    model_args = read_config(model_dir)  # a wrong model is refused before the data are read
    tokenizer = Tokenizer(model_dir)
    if tokenizer.vocab_size > model_args.vocab_size:
        raise UserError(
            f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{model_args.vocab_size}; the tokenizer belongs to another model"
        )
    pairs = [pair for path in args.data for pair in load_pairs(path, args.domain, log=log)]
    train_set = encode_pairs(pairs, tokenizer, args.max_len, log=log)
    eval_set = []
    if args.eval_data:
        eval_pairs = [pair for path in args.eval_data for pair in load_pairs(path, args.domain, log=log)]
        eval_set = encode_pairs(eval_pairs, tokenizer, args.max_len, log=log)
    if not train_set:
        raise UserError(f"--max_len {args.max_len} is too small for any pair in --data; raise it (the paper uses 512)")
    if len(train_set) < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_set)} usable pairs in --data; lower it")
    steps_per_epoch = len(train_set) // args.batch_size  # the last partial batch of an epoch is left out
    total_steps = args.max_steps or max(1, math.floor(args.epochs * steps_per_epoch))
    pad_id = tokenizer.special_ids.get("<|finetune_right_pad_id|>", tokenizer.eot_id)

    # ---- model: frozen base weights in `dtype`, fp32 LoRA on the target projections (same init on every rank)
    model = load_model(model_dir, dtype=dtype, device=device)
    torch.manual_seed(args.seed)
    add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=tuple(args.lora_targets))
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) if distributed else model
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    # ---- outputs, and resuming
    out = Path(args.out)
    start_step = 0
    if args.resume:
        start_step = resume(out, model, optimizer, args, log)
    if master:  # rows of steps that this run does again (or of an older run in this --out) go
        keep_metrics_up_to(out / "metrics.jsonl", start_step)

    # ---- the plan
    memory = training_memory_gib(model.args, sum(p.numel() for p in trainable), args.micro_batch_size, args.max_len,
                                 weight_bytes=dtype.itemsize, checkpointing=args.grad_checkpointing)
    log(
        f"model: {args.model} ({model.args.num_hidden_layers} layers, width {model.args.hidden_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}) on {world_size} x {device.type}\n"
        f"trainable: {sum(p.numel() for p in trainable):,} LoRA parameters (r {args.lora_r}, alpha {args.lora_alpha}, "
        f"{' '.join(args.lora_targets)})\n"
        f"steps: {total_steps} of {args.batch_size} pairs ({steps_per_epoch} per epoch, "
        f"{len(train_set) - steps_per_epoch * args.batch_size} pairs of each epoch's last partial batch left out); "
        f"{accumulation} micro-steps of {args.micro_batch_size} pairs per rank per step\n"
        f"memory per rank (estimate): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.items())
        + f", total {sum(memory.values()):.2f} GiB"
    )

    def loss_of(batch):
        """The objective on one micro-batch: (loss, metrics, number of tokens)."""
        tokens, response_mask = (t.to(device) for t in collate(batch, pad_id))
        with torch.no_grad(), adapter_disabled(model):  # pi1: the same weights with the adapter off
            base_hidden = model(tokens, return_hidden=True)
        hidden = ddp_model(tokens, return_hidden=True)  # Q: the adapter on, through DDP for the gradient sync
        if args.objective == "qadapter":
            loss, metrics = qadapter_loss_from_hidden(
                model.head_weight, hidden, base_hidden, tokens, response_mask,
                alpha=args.alpha, alpha0=args.alpha0, beta=args.beta, gamma=args.gamma,
            )
        else:
            loss, metrics = dpo_loss_from_hidden(model.head_weight, hidden, base_hidden, tokens, response_mask, beta=args.dpo_beta)
            metrics["chi2_loss"] = torch.zeros(())
        lengths = response_mask.shape[1] - response_mask.flip(1).int().argmax(1)  # unpadded length of each row
        return loss, metrics, int(lengths.sum())

    def evaluate():
        """eval_loss and eval_accuracy over the eval pairs, each rank taking every world_size-th micro-batch."""
        model.eval()
        totals = torch.zeros(3, device=device)  # loss sum, accuracy sum, pairs
        with torch.no_grad():
            for i in range(rank * args.micro_batch_size, len(eval_set), world_size * args.micro_batch_size):
                batch = eval_set[i : i + args.micro_batch_size]
                loss, metrics, _ = loss_of(batch)
                totals += torch.tensor([loss.item() * len(batch), metrics["accuracy"].item() * len(batch), len(batch)], device=device)
        if distributed:
            dist.all_reduce(totals)
        model.train()
        return {"eval_loss": (totals[0] / totals[2]).item(), "eval_accuracy": (totals[1] / totals[2]).item()}

    # ---- training
    metric_names = ["loss", "pref_loss", "chi2_loss", "accuracy", "margin"]
    started = time.time()
    non_finite_in_a_row = 0
    with out_of_memory_advice(memory, rank, device):
        for step in range(start_step, total_steps):
            step_started = time.time()
            # The step's pairs: a slice of one seeded permutation per epoch, the same on every rank whatever the
            # number of ranks; rank r takes the r-th share. Dropout is seeded from (seed, rank, step), so a resumed
            # run repeats exactly what an uninterrupted one does without saving RNG states.
            epoch, index = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            step_pairs = order[index * args.batch_size : (index + 1) * args.batch_size]
            my_pairs = [train_set[i] for i in step_pairs[rank * per_rank : (rank + 1) * per_rank]]
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)

            sums = torch.zeros(len(metric_names) + 1, device=device)  # metric sums over this rank's pairs, then tokens
            for micro in range(accumulation):
                batch = my_pairs[micro * args.micro_batch_size : (micro + 1) * args.micro_batch_size]
                sync = micro == accumulation - 1  # all-reduce the gradients once, on the last micro-step
                with ddp_model.no_sync() if distributed and not sync else nullcontext():
                    loss, metrics, tokens = loss_of(batch)
                    # the micro-batch loss is a mean over its pairs; the step's loss is the mean over all its pairs
                    (loss / accumulation).backward()
                values = [loss.item()] + [metrics[name].item() for name in metric_names[1:]]
                sums += torch.tensor([v * len(batch) for v in values] + [tokens], device=device)
            if distributed:
                dist.all_reduce(sums)
            means = {name: (sums[i] / args.batch_size).item() for i, name in enumerate(metric_names)}

            lr = lr_at(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
            done = step + 1
            # Every rank sees the same all-reduced loss and gradient norm, so all skip the same steps.
            if not (math.isfinite(means["loss"]) and math.isfinite(grad_norm.item())):
                optimizer.zero_grad(set_to_none=True)
                non_finite_in_a_row += 1
                log(f"step {done}/{total_steps} | non-finite loss or gradient: update skipped")
                append_metrics(out, {"step": done, "skipped": "non-finite loss or gradient"}, master)
                if non_finite_in_a_row >= MAX_NON_FINITE_STEPS:
                    raise UserError(
                        f"the loss or gradient was not finite for {MAX_NON_FINITE_STEPS} steps in a row (up to step {done}); "
                        f"lower --lr or check --data"
                        + (f"; {out / CHECKPOINT} holds the last good state" if (out / CHECKPOINT).exists() else "")
                    )
                continue
            non_finite_in_a_row = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.time() - step_started
            if done % args.log_every == 0 or done == 1 or done == total_steps:
                row = {"step": done, **means, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": sums[-1].item() / elapsed}
                eta = (time.time() - started) / (done - start_step) * (total_steps - done)
                log(
                    f"step {done}/{total_steps} | loss {means['loss']:.4f} | accuracy {means['accuracy']:.2f} | "
                    f"margin {means['margin']:.3f} | {row['tokens_per_s']:.0f} tokens/s | ETA {eta:.0f}s"
                )
                append_metrics(out, row, master)
            if eval_set and ((args.eval_every and done % args.eval_every == 0) or done == total_steps):
                row = {"step": done, **evaluate()}
                log(f"step {done}/{total_steps} | eval_loss {row['eval_loss']:.4f} | eval_accuracy {row['eval_accuracy']:.2f}")
                append_metrics(out, row, master)
            if args.save_every and done % args.save_every == 0 and done < total_steps and master:
                save_checkpoint(out, model, optimizer, done, args)

    if master:  # the outputs appear only now, complete: a run that fails early leaves nothing behind
        qadapter_config = {
            "objective": args.objective, "alpha": args.alpha, "alpha0": args.alpha0, "beta": args.beta,
            "gamma": args.gamma, "dpo_beta": args.dpo_beta, "base_model": args.model,
            "base_model_fingerprint": model_fingerprint(model), "args": vars(args),
        }
        save_adapter(model, out, base_model_name_or_path=args.model)
        atomic_write(out / "qadapter_config.json", lambda p: p.write_text(json.dumps(qadapter_config, indent=2) + "\n"))
        (out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: nothing left to resume
        log(f"adapter written to {out}/ ({time.time() - started:.0f}s)")
        if args.builtin:  # show both axes: the new preference learned, the old skills kept
            report = toyworld.compare(model, tokenizer, eval_set, args)
            log(toyworld.format_report(report, args.objective))
            atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    if distributed:
        dist.barrier()  # leave together, rank 0's files written
        dist.destroy_process_group()
        # Gloo's worker threads can abort the interpreter's own shutdown ("terminate called without an
        # active exception", pytorch/pytorch#190489); the work is done and saved, so leave at once.
        sys.stdout.flush()
        os._exit(0)


@contextmanager
def out_of_memory_advice(memory: dict, rank: int, device):
    """Turn a CUDA out-of-memory error into one sentence with the memory plan and the flags that reduce it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"rank {rank} ran out of GPU memory on {device}; the plan estimated {sum(memory.values()):.1f} GiB per rank ("
            + ", ".join(f"{k} {v:.2f}" for k, v in memory.items())
            + "); add --grad_checkpointing, lower --micro_batch_size or --max_len, or use --dtype bf16"
        ) from None


def append_metrics(out: Path, row: dict, master: bool):
    if master:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def keep_metrics_up_to(path: Path, step: int):
    """Keep the rows of steps up to `step`: on resume the later steps run again; a fresh run keeps none."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, lambda p: p.write_text("".join(row + "\n" for row in rows)))


# Flags that must match for a checkpoint to continue a run.
RESUME_FLAGS = ["model", "data", "domain", "objective", "alpha", "alpha0", "beta", "gamma", "dpo_beta", "lr",
                "warmup_steps", "batch_size", "epochs", "max_steps", "max_len", "lora_r", "lora_alpha",
                "lora_dropout", "lora_targets", "seed"]


def save_checkpoint(out: Path, model, optimizer, step: int, args):
    """Everything --resume needs, in one file written atomically: the LoRA weights, AdamW's state, the step.
    The step fixes the position in the data and the dropout seeds; the learning rate is a function of it."""
    state = {
        "step": step,
        "lora": {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "flags": {name: getattr(args, name) for name in RESUME_FLAGS},
    }
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


def resume(out: Path, model, optimizer, args, log) -> int:
    path = out / CHECKPOINT
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; run without --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises whatever the unpickler meets
        raise UserError(f"--resume: {path} cannot be read ({type(error).__name__}); start afresh in another --out") from None
    changed = [name for name in RESUME_FLAGS if state["flags"].get(name) != getattr(args, name)]
    if changed:
        raise UserError(
            f"--resume: {path} was made with other flags ({', '.join('--' + n for n in changed)}); "
            f"rerun with the original flags or start afresh in another --out"
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state["lora"][name])
    optimizer.load_state_dict(state["optimizer"])
    log(f"resumed from {path} at step {state['step']}")
    return state["step"]


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        # Under torchrun every rank meets the same data and flags, so rank 0 speaks for all; an error of
        # one rank alone (out of memory) names its rank. torchrun then ends the other ranks.
        if os.environ.get("RANK", "0") == "0" or str(error).startswith("rank "):
            print(f"error: {error}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            os._exit(2)  # skip the process group's shutdown, which would wait for ranks that wait for us
        sys.exit(2)
