"""Experiment tracking: train.py --wandb_project P logs every metrics row (eval rows too) to Weights &
Biases from rank 0, at the row's step, with the run's flags as the run's config. wandb is optional
(requirements-eval.txt) and imported only here, only when asked; WANDB_MODE=offline keeps the run on
disk for `wandb sync` later."""

import importlib.util

from qadapter_min import UserError

run = None  # this process's wandb run, once started (rank 0 alone)


def check(args):
    """Refuse, before any work, tracking that cannot start."""
    if args.wandb_run_name is not None and args.wandb_project is None:
        raise UserError("--wandb_run_name names a run of --wandb_project; pass the project too")
    if args.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise UserError(
            "--wandb_project logs to Weights & Biases, which is not installed: pip install -r requirements-eval.txt"
        )


def start(args, processes):
    global run
    if args.wandb_project is not None and processes.master:
        import wandb

        run = wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=vars(args))


def log(row: dict):
    """One metrics.jsonl row, its numbers at its step."""
    if run is not None:
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        run.log(numbers, step=row["step"])


def finish():
    """End the run and wait for wandb's service process to write all of it: finish() alone can
    return while the run's file is still being written."""
    global run
    if run is not None:
        import wandb

        run.finish()
        wandb.teardown()
        run = None
