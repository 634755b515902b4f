"""Customise a pre-trained Llama to new preferences with Q-Adapter (or DPO, SFT, Replay).

Built-in world:     python train.py     (a tiny pre-trained model and a preference: CPU, a minute)
One process:        python train.py --model DIR_OR_HUB_ID --data pairs.json
One node, 4 GPUs:   torchrun --nproc_per_node=4 train.py --model meta-llama/Llama-3.1-8B-Instruct
Sharded (FSDP2):    torchrun --nproc_per_node=4 train.py ... --fsdp   (models larger than one GPU)
Several nodes:      torchrun --nnodes 2 ... train.py ...   (docs/scaling.md)
(python train.py --nproc_per_node 4 starts the same processes itself, after checking every flag.)

With neither --model nor --data, train.py runs the built-in world of toyworld/ with the flags it
prints first (flags you add win), and ends with a table of what the model learned and what it kept.

main() reads as the stages of a run: check every flag and path, set up the processes, read the data,
build the model, print the plan, train, write the outputs. Each optimizer step runs the
micro-batches of this rank's share of the step's pairs (step.py: the base model pi1 under no_grad
with the adapter off, then Q with the adapter on), syncs gradients on the last micro-step only,
clips, steps AdamW, logs, evaluates and checkpoints. The run directory's contract is run_dir.py's.
"""

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import toyworld
from qadapter_min import UserError, run_dir, tracking
from qadapter_min.common import Progress, choose_dtype, full, run_command_line
from qadapter_min.data import collate, encode_conversations, encode_pairs, load_conversations, load_pairs
from qadapter_min.flags import check_flags, defaults, parse_args
from qadapter_min.lora import add_lora, dropout_keys, keyed_dropout_masks
from qadapter_min.memory import out_of_memory_advice, training_plan
from qadapter_min.objective import Objective
from qadapter_min.processes import Processes, leave_processes, start_processes
from qadapter_min.reward import add_score_head, reward_model_pairs
from qadapter_min.sharding import evaluation_batches, gradient_sync, load_sharded_model
from qadapter_min.step import micro_batch_objective
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model, read_config


def main(argv=None):
    args = parse_args(argv, __doc__, world=toyworld.train_flags())  # flags.py: the flags, and their help
    check_flags(args)
    objective = Objective.read(vars(args))
    checkpoint = run_dir.check_out_dir(args, defaults())  # with --resume, its flags checked
    processes = start_processes(args.nproc_per_node)
    tracking.start(args, processes)  # --wandb_project: every metrics row, also to W&B
    model_dir, tokenizer, train_set, eval_set = read_data(args, objective, processes)
    model, wrapped, adamw = build_model(model_dir, args, objective, processes)
    out, start_step = Path(args.out), 0
    if checkpoint is not None:
        start_step = run_dir.restore(checkpoint, model, adamw, out, processes)
    steps_per_epoch = len(train_set) // args.batch_size  # an epoch's last partial batch is left out
    total_steps = args.max_steps or max(1, math.floor(args.epochs * steps_per_epoch))
    memory = training_plan(args, model, len(train_set), total_steps, processes)
    if args.overwrite and processes.master:
        run_dir.remove_outputs(out)  # the earlier run's results go only now that this one can start
    started, steps, pad_id = time.time(), range(start_step, total_steps), tokenizer.pad_id
    with out_of_memory_advice(memory, processes):
        train(model, wrapped, adamw, objective, train_set, eval_set, pad_id, steps, args, processes)
    # only now, complete
    run_dir.write_outputs(model, args, total_steps, len(train_set), processes, model_dir, pad_id)
    written = "reward model" if objective.name == "rm" else "adapter"
    processes.log(f"{written} written to {args.out}/ ({time.time() - started:.0f}s)")
    if toyworld.is_world_model(model_dir):  # the built-in world's table, printed after its run
        from toyworld.report import report_run

        report_run(model, model_dir, tokenizer, pad_id, args, processes)
    del wrapped, adamw, model  # DDP holds the process group: let it go before the group ends
    tracking.finish()
    leave_processes(processes)


# ------------------------------------------------------------------------------------------------
# Data and model


def read_data(args, objective: Objective, processes: Processes):
    """(model directory, tokenizer, training pairs, eval pairs), encoded; every rank reads them."""
    model_dir = processes.resolve_model_dir(args.model)
    config = read_config(model_dir)  # a wrong model is refused before the data are read
    if args.max_len > config.max_position_embeddings:
        raise UserError(
            f"--max_len {args.max_len} is beyond the model's context of "
            f"{config.max_position_embeddings} tokens (config.json); lower it"
        )
    tokenizer = Tokenizer(model_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
            f"vocab_size is {config.vocab_size}; the tokenizer belongs to another model"
        )

    def encoded(paths):
        log = processes.log
        if not objective.on_pairs:  # SFT: conversations, each ending with the reply to learn
            records = load_conversations(paths, args.domain, log=log)
            return encode_conversations(records, tokenizer, args.max_len, log=log)
        pairs = load_pairs(paths, args.domain, log=log)
        if objective.name == "rm":  # each conversation to the very end that a reward model reads
            return reward_model_pairs(pairs, tokenizer, args.max_len, log=log)
        return encode_pairs(pairs, tokenizer, args.max_len, log=log)

    train_set = encoded(args.data)
    eval_set = encoded(args.eval_data) if args.eval_data else []
    if not train_set:
        raise UserError(f"--max_len {args.max_len} is too small for any pair in --data; raise it (the paper uses 512)")
    if len(train_set) < args.batch_size:
        raise UserError(
            f"--batch_size {args.batch_size} is larger than the {len(train_set)} usable pairs in --data; lower it"
        )
    return model_dir, tokenizer, train_set, eval_set


def build_model(model_dir: Path, args, objective: Objective, processes: Processes):
    """The frozen base weights in the run's dtype, fp32 LoRA on the target projections (the same
    init on every rank) and a reward model's score head, what runs the adapter pass (under torchrun
    the DDP wrapper that syncs the LoRA gradients; with --fsdp the model sharded over the ranks,
    sharding.py) and AdamW."""
    score_head = objective.name == "rm"
    dtype = choose_dtype(args.dtype, processes.device)
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=tuple(args.lora_targets))
    if args.fsdp and processes.distributed:  # weights, LoRA, gradients and AdamW's state split
        torch.manual_seed(args.seed)
        model = load_sharded_model(model_dir, dtype, processes.device, score_head, **lora)
        wrapped = model
    else:
        model = wrapped = load_model(model_dir, dtype=dtype, device=processes.device)
        torch.manual_seed(args.seed)
        add_lora(model, **lora)
        if score_head:
            add_score_head(model, processes.device)
        if processes.distributed:
            device_ids = [processes.local_rank] if processes.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=device_ids)
    model.gradient_checkpointing = args.grad_checkpointing
    if args.compile:  # each block traced into fused kernels
        from qadapter_min.compiled import compile_for_training  # imported for --compile alone

        compile_for_training(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, wrapped, torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)


# ------------------------------------------------------------------------------------------------
# Training


def train(model, wrapped, adamw, objective, train_set, eval_set, pad_id, steps, args, processes):
    """The optimizer steps of range `steps`, with logging, evaluation and checkpoints."""
    out, total_steps = Path(args.out), steps.stop
    trainable = [p for p in model.parameters() if p.requires_grad]
    non_finite_in_a_row, done = 0, steps.start
    train_seconds, eval_seconds, evals = 0.0, 0.0, 0  # for the ETA, which counts both
    try:
        for step in steps:
            step_started = time.time()
            rank, world_size = processes.rank, processes.world_size
            my_pairs = step_plan(step, rank, world_size, len(train_set), args.batch_size, args.seed)
            means, tokens = run_micro_batches(
                model, wrapped, objective, train_set, my_pairs, step, pad_id, args, processes
            )
            lr = lr_at(step, total_steps, args)
            for group in adamw.param_groups:
                group["lr"] = lr
            max_norm = args.grad_clip or float("inf")  # 0: no clipping
            grad_norm = full(torch.nn.utils.clip_grad_norm_(trainable, max_norm)).item()
            done, train_seconds = step + 1, train_seconds + time.time() - step_started
            # Every rank sees the same all-reduced loss and gradient norm: all skip the same steps.
            if not (math.isfinite(means["loss"]) and math.isfinite(grad_norm)):
                adamw.zero_grad(set_to_none=True)
                non_finite_in_a_row += 1
                run_dir.skip_step(out, done, total_steps, non_finite_in_a_row, processes)
                continue
            non_finite_in_a_row = 0
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            if done % args.log_every == 0 or done == 1 or done == total_steps:
                tokens_per_s = tokens / (time.time() - step_started)
                row = {"step": done, **means, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
                eta = eta_seconds(steps, done, train_seconds, eval_seconds, evals, eval_set, args)
                shown = "".join(f" | {n} {means[n]:.3f}" for n in shown_metrics(objective))
                processes.log(
                    f"step {done}/{total_steps} | loss {means['loss']:.4f}{shown} | "
                    f"{tokens_per_s:.0f} tokens/s | ETA {eta:.0f}s"
                )
                run_dir.append_metrics(out, row, processes)
            if evaluates_at(done, total_steps, eval_set, args):
                eval_started = time.time()
                results = evaluate(model, objective, eval_set, pad_id, args, processes)
                row = {"step": done, **results}
                eval_seconds, evals = eval_seconds + time.time() - eval_started, evals + 1
                shown = "".join(f" | {n} {row[n]:.3f}" for n in list(row)[2:])
                processes.log(f"step {done}/{total_steps} | eval_loss {row['eval_loss']:.4f}{shown}")
                run_dir.append_metrics(out, row, processes)
            if args.save_every and done % args.save_every == 0 and done < total_steps:
                run_dir.save_checkpoint(out, model, adamw, done, args, processes)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(run_dir.how_to_go_on(out, done, total_steps)) from None


def step_plan(step: int, rank: int, world_size: int, num_pairs: int, batch_size: int, seed: int):
    """The indices of the pairs that optimizer step `step` (0-based) gives to process `rank`: a pure
    function of its arguments, so a resumed run repeats exactly what an uninterrupted one does.

    The step's pairs are a slice of one seeded permutation per epoch, the same whatever the number
    of ranks; rank r takes the r-th share. The last partial batch of an epoch is left out.
    """
    epoch, index = divmod(step, num_pairs // batch_size)
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch))
    step_pairs = order.tolist()[index * batch_size : (index + 1) * batch_size]
    per_rank = batch_size // world_size
    return step_pairs[rank * per_rank : (rank + 1) * per_rank]


def run_micro_batches(model, wrapped, objective, train_set, pairs, step, pad_id, args, processes):
    """Forward and backward over this rank's pairs of one step, micro-batch by micro-batch, the
    gradients all-reduced on the last; (the step's metrics, means over its pairs, its tokens)."""
    size, device = args.micro_batch_size, processes.device
    accumulation, names = len(pairs) // size, objective.metric_names
    sums = torch.zeros(len(names) + 1, device=device)  # metric sums over the pairs, then tokens
    for micro in range(accumulation):
        indices = pairs[micro * size : (micro + 1) * size]
        batch = [train_set[i] for i in indices]
        tokens, response_mask = (t.to(device) for t in collate(batch, pad_id))
        keys = dropout_keys(args.seed, step, indices, sides=2 if objective.on_pairs else 1)
        sync = micro == accumulation - 1  # all-reduce the gradients once, on the last micro-step
        with gradient_sync(wrapped, sync), keyed_dropout_masks(model, keys.to(device)):
            loss, metrics = micro_batch_objective(model, tokens, response_mask, objective, wrapped)
            # the micro-batch loss is a mean over its pairs; the step's, over all the step's pairs
            (loss / accumulation).backward()
        values = [loss.item()] + [metrics[name].item() for name in names[1:]]
        lengths = response_mask.shape[1] - response_mask.flip(1).int().argmax(1)  # unpadded
        sums += torch.tensor([v * len(batch) for v in values] + [int(lengths.sum())], device=device)
    if processes.distributed:
        dist.all_reduce(sums)
    means = {name: (sums[i] / args.batch_size).item() for i, name in enumerate(names)}
    return means, sums[-1].item()


def evaluate(model, objective, eval_set, pad_id, args, processes: Processes) -> dict:
    """eval_loss and eval_ of the shown metrics (means over the eval pairs), each rank taking its
    share of the micro-batches (sharding.evaluation_batches)."""
    model.eval()
    names = ("loss", *shown_metrics(objective))
    totals = torch.zeros(len(names) + 1, device=processes.device)  # sums over pairs, then pairs
    rank, world_size = processes.rank, processes.world_size
    with torch.no_grad():
        batches = list(evaluation_batches(eval_set, args.micro_batch_size, rank, world_size, model))
        progress = Progress("evaluation", len(batches), "micro-batches")
        for batch, weight in batches:
            tokens, response_mask = (t.to(processes.device) for t in collate(batch, pad_id))
            loss, metrics = micro_batch_objective(model, tokens, response_mask, objective)
            values = [loss.item()] + [metrics[name].item() for name in names[1:]]
            totals += torch.tensor([v * weight for v in values] + [weight], device=processes.device)
            progress.advance()
    if processes.distributed:
        dist.all_reduce(totals)
    model.train()
    return {f"eval_{name}": (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def shown_metrics(objective: Objective) -> tuple[str, ...]:
    """How the model scores pairs, beside the loss on the log line and in the eval rows."""
    return tuple(n for n in objective.metric_names if n.endswith(("accuracy", "margin")))


def eta_seconds(steps, done, train_seconds, eval_seconds, evals, eval_set, args) -> float:
    """The time left: the steps at the pace so far, and the evaluations to come at theirs (before
    the first, one is guessed at a third of training on as many pairs: forward passes alone)."""
    per_step = train_seconds / (done - steps.start)
    per_eval = eval_seconds / evals if evals else per_step * len(eval_set) / args.batch_size / 3
    evals_left = sum(evaluates_at(s, steps.stop, eval_set, args) for s in range(done, steps.stop + 1))
    return per_step * (steps.stop - done) + per_eval * evals_left


def evaluates_at(step: int, total_steps: int, eval_set, args) -> bool:
    """Whether eval rows follow optimizer step `step` (1-based): each --eval_every, and the last."""
    return bool(eval_set) and (args.eval_every and step % args.eval_every == 0 or step == total_steps)


def lr_at(step: int, total_steps: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then linear decay to 0."""
    if step < args.warmup_steps:
        return args.lr * step / args.warmup_steps
    return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))


if __name__ == "__main__":
    run_command_line(main)
