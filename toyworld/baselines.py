"""The paper's comparison on the built-in world: Q-Adapter, DPO, SFT and Replay trained with the same
settings, then measured side by side by evaluate.py, the base model as the first column.

    python -m toyworld.baselines                   # into out-baselines/ (about 3 minutes on 2 cores)
    python -m toyworld.baselines --out DIR -- --seed 1   # flags after -- go to every train.py run

The commands it runs, printed as it goes, are the documented way to run the baselines:
    python train.py <the world's flags> --out DIR/qadapter
    python train.py <the world's flags> --objective dpo --out DIR/dpo
    python train.py <the world's flags> --objective sft --out DIR/sft
    python sample.py --model toyworld/model --prompts toyworld/train.jsonl --out DIR/replay.jsonl \\
        --temperature 0 --unique
    python train.py <the world's flags> --objective sft --data toyworld/train.jsonl DIR/replay.jsonl --out DIR/replay
    python evaluate.py --adapter DIR/qadapter DIR/dpo DIR/sft DIR/replay --output DIR/results.json
Replay is SFT on the chosen replies plus the base model's own greedy replies to the unique training
prompts, which it is thereby asked to keep.
"""

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import toyworld
from qadapter_min.common import without_flags


def run(number: int, what: str, command: list[str]):
    """Run one command, printed as it can be pasted; its number, what it is and its time go to
    stderr. Stop at the first that fails."""
    print("$ python " + shlex.join(command), flush=True)
    print(f"[{number}/{RUNS}] {what} ...", file=sys.stderr, flush=True)
    started = time.time()
    result = subprocess.run(
        [sys.executable, *command], stdout=subprocess.DEVNULL if command[0] != "evaluate.py" else None
    )
    if result.returncode != 0:
        sys.exit(result.returncode)
    print(f"[{number}/{RUNS}] {what}: {time.time() - started:.0f}s", file=sys.stderr, flush=True)


RUNS = 6  # three trainings, the base model's replies, Replay's training, the evaluation


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out-baselines", help="where the four runs and the results go")
    p.add_argument("extra", nargs="*", help="after --: flags for every train.py run")
    args = p.parse_args()
    typed = {flag for flag in args.extra if flag.startswith("--")}  # each flag once, typed ones win
    out, world = Path(args.out), without_flags(toyworld.train_flags(), typed) + args.extra
    train_data = world[world.index("--data") + 1]
    runs = [("qadapter", "Q-Adapter", []), ("dpo", "DPO", ["--objective", "dpo"])]
    for number, (name, what, flags) in enumerate(runs + [("sft", "SFT", ["--objective", "sft"])], 1):
        run(number, what, ["train.py", *world, *flags, "--out", str(out / name), "--overwrite"])
    replay = out / "replay.jsonl"
    replay.unlink(missing_ok=True)
    model = world[world.index("--model") + 1]
    sample = ["sample.py", "--model", model, "--prompts", train_data, "--out", str(replay)]
    run(4, "the base model's replies, Replay's data", [*sample, "--temperature", "0", "--unique"])
    at = world.index("--data")  # Replay: the chosen replies and the base model's own, together
    replay_world = world[:at] + ["--data", train_data, str(replay)] + world[at + 2 :]
    replay_flags = ["--objective", "sft", "--out", str(out / "replay"), "--overwrite"]
    run(5, "Replay", ["train.py", *replay_world, *replay_flags])
    adapters = [str(out / name) for name in ("qadapter", "dpo", "sft", "replay")]
    output = ["--output", str(out / "results.json")]
    run(6, "evaluate.py, the four side by side", ["evaluate.py", "--adapter", *adapters, *output])


if __name__ == "__main__":
    main()
