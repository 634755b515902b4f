"""Pictures, with matplotlib (pip install -r requirements-eval.txt), which only this file imports:

    python -m qadapter_min.plots out out-dpo --output curves.png   # runs' training curves side by side

draws each run's metrics.jsonl (train.py's --out) as small panels, one per metric a run logged, each run
its own colour; and evaluate.py --plot FILE.png draws the learning-forgetting frontier (frontier_plot).
"""

import math
from pathlib import Path

from qadapter_min import UserError
from qadapter_min.common import Parser, check_output_file, read_jsonl, run_command_line
from qadapter_min.frontier import direction

# metrics.jsonl's keys, each a panel where some run logged it
PANELS = {
    "loss": "loss",
    "pref_loss": "preference loss",
    "chi2_loss": "chi2 loss",
    "preference_accuracy": "preference accuracy (training batch)",
    "preference_margin": "preference margin (training batch)",
    "implicit_reward_accuracy": "implicit reward accuracy (training batch)",
    "implicit_reward_margin": "implicit reward margin (training batch)",
    "reward_accuracy": "reward model accuracy (training batch)",
    "reward_margin": "reward model margin (training batch)",
    "eval_loss": "eval loss",
    "eval_preference_accuracy": "eval preference accuracy",
    "eval_preference_margin": "eval preference margin",
    "eval_implicit_reward_accuracy": "eval implicit reward accuracy",
    "eval_implicit_reward_margin": "eval implicit reward margin",
    "eval_reward_accuracy": "eval reward model accuracy",
    "eval_reward_margin": "eval reward model margin",
    "lr": "learning rate",
}


def pyplot():
    """matplotlib's pyplot, drawing into files; refused in one sentence where it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib, which is not installed: pip install -r requirements-eval.txt") from None
    matplotlib.use("Agg")  # files, no window
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: str) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run} holds no metrics.jsonl; pass the --out directories of train.py runs")
    return read_jsonl(path, "is it train.py's metrics.jsonl?")


def training_curves(runs: dict[str, list[dict]], output: Path):
    """runs: {name: metrics.jsonl's rows}; a panel per metric any run logged, each run a line."""
    plt = pyplot()
    keys = [k for k in PANELS if any(k in row for rows in runs.values() for row in rows)]
    columns = min(3, len(keys))
    lines = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3 * lines), squeeze=False)
    for panel, key in zip(axes.flat, keys):
        for colour, (name, rows) in enumerate(runs.items()):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                steps, values = zip(*points)
                panel.plot(steps, values, color=f"C{colour}", label=name, marker="." if len(points) < 20 else None)
        panel.set_title(PANELS[key], fontsize=10)
        panel.set_xlabel("step", fontsize=8)
        panel.tick_params(labelsize=8)
    for panel in axes.flat[len(keys) :]:
        panel.set_visible(False)
    figure.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=min(6, len(runs)))
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(output, dpi=100)
    plt.close(figure)


def knob(point_and_setting):
    point, _ = point_and_setting
    return point["scale"], point["alpha0"] or 0.0


def frontier_plot(front: dict, output: Path):
    """frontier.frontier_of's points: the base model as a star, and a line per adapter through its points
    in order of the knob (per alpha0, where both knobs move), each point labelled with its setting."""
    plt = pyplot()
    learned, kept = front["learned"], front["kept"]
    base = next(p for p in front["points"] if p["adapter"] is None)
    adapters = [p for p in front["points"] if p["adapter"]]
    both_knobs = len({p["scale"] for p in adapters}) > 1 and len({p["alpha0"] for p in adapters}) > 1
    curves = {}  # {curve's name: [(learned, kept, the point's setting)]}, in the order measured
    for p in adapters:
        name, setting = Path(p["adapter"]).name or p["adapter"], p["name"][len(p["adapter"]) :]
        if both_knobs and p["alpha0"] is not None:  # a curve per alpha0, along the scale
            name, setting = f"{name} a0 {p['alpha0']:g}", f"x{p['scale']:g}"
        curves.setdefault(name, []).append((p, setting.strip() or "as trained"))
    curves = {
        name: [(p["learned"], p["kept"], setting) for p, setting in sorted(points, key=knob)]
        for name, points in curves.items()
    }
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for colour, (name, points) in enumerate(curves.items()):
        xs, ys, labels = zip(*points)
        size = max(3.0, 11 - 1.5 * colour)  # curves that share points show as rings inside rings
        axes.plot(xs, ys, color=f"C{colour}", marker="o", markersize=size, label=name, alpha=0.85)
        for x, y, label in points:
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{colour}")
    axes.plot(
        base["learned"], base["kept"], color="black", marker="*", markersize=12, linestyle="none", label="base model"
    )
    axes.set_xlabel(f"{learned} ({direction(learned)})")
    axes.set_ylabel(f"{kept} ({direction(kept)})")
    axes.set_title("learned (x) against kept (y)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("runs", nargs="+", help="train.py --out directories, each a colour")
    p.add_argument("--output", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    check_output_file("output", args.output)
    pyplot()  # refused now if missing, before the runs are read
    names = [Path(run).resolve().name for run in args.runs]
    runs = dict(zip(names if len(set(names)) == len(names) else args.runs, map(read_metrics, args.runs)))
    training_curves(runs, Path(args.output))
    print(f"training curves of {len(runs)} run(s): {args.output}")


if __name__ == "__main__":
    run_command_line(main)
