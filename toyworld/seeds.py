"""The built-in run over several seeds: does the table hold for every seed, or for one?

    python -m toyworld.seeds                          # Q-Adapter and DPO, seeds 1-5 (about 5 minutes on 2 cores)
    python -m toyworld.seeds --seeds 1 2 --objectives qadapter -- --lr 1e-3   # flags after -- go to train.py

Each run is a bare `python train.py --seed S --objective O` (plus the flags after --), its output kept in
a temporary directory. Printed: one line per run, then for each objective the mean over the seeds and
the worst seed of every number of the built-in table.
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import train
from toyworld.world import PREFERENCE_SKILLS, SKILLS


def run(seed: int, objective: str, extra: list[str], directory: Path) -> dict:
    """report.json's "customised" numbers of one bare run, flattened: {"preference_rate/geography": ...}."""
    out = directory / f"{objective}-{seed}"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--seed", str(seed), "--objective", objective, *extra, "--out", str(out)])
    report = json.loads((out / "report.json").read_text())["customised"]
    numbers = {"preference_accuracy": report["preference_accuracy"]}
    for key in ("preference_rate", "skill_accuracy"):
        numbers[key] = report[key]
        numbers.update({f"{key}/{skill}": report[f"{key}_by_skill"][skill] for skill in SKILLS})
    return numbers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="the seeds to run")
    p.add_argument("--objectives", nargs="+", default=["qadapter", "dpo"], help="the objectives to run")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    with tempfile.TemporaryDirectory() as directory:
        number, total = 0, len(args.objectives) * len(args.seeds)
        for objective in args.objectives:
            runs = {}
            for seed in args.seeds:
                number, started = number + 1, time.time()
                print(f"[{number}/{total}] {objective}, seed {seed} ...", file=sys.stderr, flush=True)
                runs[seed] = run(seed, objective, extra, Path(directory))
                seconds = time.time() - started
                print(f"[{number}/{total}] {objective}, seed {seed}: {seconds:.0f}s", file=sys.stderr)
                print(
                    f"{objective} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[seed].items()), flush=True
                )
            print(f"\n{objective} over seeds {' '.join(map(str, args.seeds))}: mean (worst seed)")
            for key in runs[args.seeds[0]]:
                values = [numbers[key] for numbers in runs.values()]
                skill = key.partition("/")[2]
                note = "" if not skill else " (in the preference data)" if skill in PREFERENCE_SKILLS else " (held out)"
                print(f"  {key + note:52} {statistics.mean(values):5.2f} ({min(values):.2f})")
            print()


if __name__ == "__main__":
    main()
