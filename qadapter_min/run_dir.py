"""The run directory (train.py --out): what a run writes there, and the contract that keeps it whole.

    adapter_model.safetensors, adapter_config.json   the adapter, in PEFT's layout (adapters.py)
    config.json, model*.safetensors, tokenizer files  instead, with --objective rm: the reward model
                                                     (reward.py)
    qadapter_config.json                             the objective, the base model, every flag
    metrics.jsonl                                    a row per logged step and per evaluation
    report.json                                      the built-in world's table (toyworld/report.py)
    README.md                                        the model card (model_card.py)
    checkpoint/state.pt                              everything --resume needs (--save_every)

The contract: an --out that cannot take the run, or holds another run's results, is refused before
any work; --overwrite removes the earlier results only once the new run can start; --resume takes
the checkpoint only with the flags it was made with (a list of what may differ, so that a flag added
later is protected by default); the outputs appear only when complete; Ctrl-C and a run of
non-finite steps end with one line that says where the run stands and how to go on.
"""

import json
import shutil
from pathlib import Path

import torch

from qadapter_min import UserError, tracking
from qadapter_min.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RUN_CONFIG,
    adapter_tensors,
    base_model_record,
    save_adapter,
    save_run_config,
)
from qadapter_min.common import atomic_write, check_output_dir, full, is_fsdp_model, like, read_jsonl
from qadapter_min.model_card import model_card
from qadapter_min.reward import TOKENIZER_FILES, save_reward_model
from qadapter_min.sharding import full_optimizer_state, load_optimizer_state
from qadapter_min.weights import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, model_fingerprint

CHECKPOINT = "checkpoint/state.pt"
METRICS = "metrics.jsonl"
REPORT = "report.json"
MODEL_CARD = "README.md"
OUTPUTS = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RUN_CONFIG, METRICS, REPORT, MODEL_CARD, "checkpoint")
REWARD_MODEL_OUTPUTS = (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *TOKENIZER_FILES, "model-*.safetensors")
# Flags that may change when a run is resumed: where it writes, how often it logs, evaluates and
# saves, what it evaluates on, and how it is spread over the ranks (a checkpoint holds whole
# tensors). Every other flag, present or future, must be the one the checkpoint was made with.
MAY_DIFFER_ON_RESUME = (
    "out",
    "resume",
    "overwrite",
    "log_every",
    "eval_every",
    "save_every",
    "eval_data",
    "fsdp",
    "nproc_per_node",
    "wandb_project",
    "wandb_run_name",
    "compile",
)
MAX_NON_FINITE_STEPS = 3  # non-finite steps in a row that stop a run


def check_out_dir(args, defaults: dict) -> dict | None:
    """Refuse, before any work, an --out that cannot take this run's results or holds another run's;
    with --resume, read the checkpoint and refuse it if it was made with other flags (defaults: the
    flags' defaults, for flags the checkpoint does not record). Returns the checkpoint, or None."""
    out = check_output_dir("out", args.out)
    if args.resume and args.overwrite:
        raise UserError("pass --resume to continue the run in --out, or --overwrite to replace it, not both")
    if args.resume:
        return read_checkpoint(out, args, defaults)
    if (out / CHECKPOINT).exists() and not args.overwrite:
        raise UserError(
            f"--out {out} holds a checkpoint of another run; pass --resume to continue "
            f"it, --overwrite to start afresh, or another --out"
        )
    earlier = [path.name for path in earlier_outputs(out)]
    if earlier and not args.overwrite:
        raise UserError(
            f"--out {out} holds the results of an earlier run ({', '.join(earlier)}); "
            f"pass another --out, or --overwrite to replace them"
        )
    return None


def read_checkpoint(out: Path, args, defaults: dict) -> dict:
    path = out / CHECKPOINT
    if not path.is_file() and (out / ADAPTER_WEIGHTS).is_file() and (out / RUN_CONFIG).is_file():
        raise UserError(
            f"--resume: the run in {out} is finished (its adapter is written); there is "
            f"nothing to continue: pass --overwrite to train it again, or another --out"
        )
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; run without --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises whatever the unpickler meets
        raise UserError(
            f"--resume: {path} cannot be read ({type(error).__name__}); start afresh in another --out"
        ) from None
    changed = changed_flags(state["flags"], vars(args), defaults)
    if changed:
        raise UserError(
            f"--resume: {path} was made with other flags ({', '.join('--' + n for n in changed)}); "
            f"rerun with the original flags or start afresh in another --out"
        )
    return state


def changed_flags(saved: dict, now: dict, defaults: dict) -> list[str]:
    """The flags that differ from a checkpoint's, except those that may. A flag the checkpoint does
    not record (added to train.py after it was made) matches only at its default, as that run did."""
    return [
        name for name in now if name not in MAY_DIFFER_ON_RESUME and saved.get(name, defaults.get(name)) != now[name]
    ]


def restore(state: dict, model, optimizer, out: Path, processes) -> int:
    """Put a checkpoint's LoRA weights and AdamW state in place, keep the metrics rows of the steps
    before it (the later ones run again); the step to continue from."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(like(state["lora"][name], p))  # under --fsdp, this rank's shard of it
    load_optimizer_state(optimizer, state["optimizer"])
    if processes.master:
        keep_metrics_up_to(out / METRICS, state["step"])
    processes.log(f"resumed from {out / CHECKPOINT} at step {state['step']}")
    return state["step"]


def append_metrics(out: Path, row: dict, processes):
    """A row of metrics.jsonl, and to the tracker with --wandb_project (tracking.py)."""
    if processes.master:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        tracking.log(row)


def keep_metrics_up_to(path: Path, step: int):
    """Keep the rows of steps up to `step`."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, lambda p: p.write_text("".join(row + "\n" for row in rows)))


def earlier_outputs(out: Path) -> list[Path]:
    """What an earlier run (of any objective) wrote to out."""
    names = OUTPUTS + REWARD_MODEL_OUTPUTS
    return [path for name in names for path in sorted(out.glob(name))]


def remove_outputs(out: Path):
    """Remove what an earlier run wrote to --out (--overwrite), and only that."""
    for path in earlier_outputs(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def save_checkpoint(out: Path, model, optimizer, step: int, args, processes):
    """Everything --resume needs, in one file written atomically: the LoRA weights, AdamW's state, the
    step and every flag. The step fixes the position in the data and the dropout keys; the learning
    rate is a function of it. The tensors are whole (under --fsdp gathered by every rank, written by
    rank 0), so any number of ranks, sharded or not, can resume it."""
    if not (processes.master or is_fsdp_model(model)):
        return
    state = {
        "step": step,
        "lora": {n: full(p).detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": full_optimizer_state(optimizer),
        "flags": vars(args),
    }
    if processes.master:
        (out / "checkpoint").mkdir(parents=True, exist_ok=True)
        atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


def write_outputs(model, args, total_steps: int, num_pairs: int, processes, model_dir: Path, pad_id: int):
    """The adapter (PEFT's layout), or with --objective rm the reward model (reward.py), and
    qadapter_config.json, written by rank 0 (under --fsdp from tensors every rank gathers); the
    checkpoint goes, the run being complete."""
    out = Path(args.out)
    fingerprint = model_fingerprint(model)
    if args.objective == "rm":
        save_reward_model(model, model_dir, out, pad_id, processes.master)
    else:
        tensors = adapter_tensors(model)
    if processes.master:
        if args.objective != "rm":
            base = base_model_record(args.model)
            save_adapter(model, out, base_model_name_or_path=base, tensors=tensors)
        epochs = total_steps * args.batch_size / num_pairs
        save_run_config(out, model, vars(args), steps=total_steps, epochs=epochs, fingerprint=fingerprint)
        write_model_card(out)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)


def write_model_card(out: Path, adapter: Path | None = None):
    """README.md in out: the card of the run in out, or (export.py) of the adapter a merged model in out
    was made from."""
    from qadapter_min.flags import defaults  # train.py's, for the command that made the run

    run = Path(adapter or out)
    config = json.loads((run / RUN_CONFIG).read_text())
    metrics = run / METRICS
    rows = read_jsonl(metrics, "train the adapter again") if metrics.exists() else []
    card = model_card(config, rows, defaults(), str(run), exported=adapter is not None)
    atomic_write(out / MODEL_CARD, lambda p: Path(p).write_text(card))


def skip_step(out: Path, done: int, total_steps: int, in_a_row: int, processes):
    """Log a step whose update was skipped; stop the run at the third in a row."""
    processes.log(f"step {done}/{total_steps} | non-finite loss or gradient: update skipped")
    append_metrics(out, {"step": done, "skipped": "non-finite loss or gradient"}, processes)
    if in_a_row >= MAX_NON_FINITE_STEPS:
        saved = f"; {out / CHECKPOINT} holds the last good state" if (out / CHECKPOINT).exists() else ""
        raise UserError(
            f"the loss or gradient was not finite for {MAX_NON_FINITE_STEPS} steps in a "
            f"row (up to step {done}); lower --lr or check --data{saved}"
        )


def how_to_go_on(out: Path, done: int, total_steps: int) -> str:
    """The line Ctrl-C leaves: the step reached, and how to continue or start again."""
    path = out / CHECKPOINT
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)["step"]
        return (
            f"stopped after step {done} of {total_steps}; rerun the same command with --resume "
            f"to continue from step {saved}, the last checkpoint in {path}"
        )
    return (
        f"stopped after step {done} of {total_steps} with no checkpoint (--save_every 0); rerun "
        f"the same command with --overwrite to start again"
    )
