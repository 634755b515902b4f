"""The learning-forgetting frontier: every point evaluate.py measured, placed by one metric of what was
learned and one of what was kept, and the points that no other point beats on both.

A point is a policy at one setting of the two knobs that are free after training (evaluate.py --scale,
--alpha0): the adapter's update scaled, W + scale (alpha/r) B A, and for a Q-Adapter the weight alpha0 of
log pi1 inside pi~. The base model is a point too (scale 0 of a DPO or SFT adapter is exactly it).

The metrics, by the names --learned and --kept take (each from what evaluate.py measured):
    preference_accuracy, preference_margin   held-out pairs (--pairs)             higher is better
    implicit_reward_accuracy, _margin        the same pairs, relative to the base  higher is better
    preference_rate, skill_accuracy          the built-in world's greedy checks   higher is better
    reply_nll                                NLL per reply token (--reply_nll)    lower is better
    reward, win_rate                         judged replies (--reward_model)      higher is better
    TASK:METRIC (e.g. facts_mc:acc)          an lm-eval task's metric (--tasks)   higher is better,
                                             lower for perplexities and bits_per_byte

Also here: the tables evaluate.py and the built-in world's report print (format_table).
"""

from pathlib import Path

from qadapter_min import UserError

# name -> (the measurement it comes from in a result of evaluate.py, its key there, higher is better)
METRICS = {
    "preference_accuracy": ("preference", "preference_accuracy", True),
    "preference_margin": ("preference", "preference_margin", True),
    "implicit_reward_accuracy": ("preference", "implicit_reward_accuracy", True),
    "implicit_reward_margin": ("preference", "implicit_reward_margin", True),
    "preference_rate": ("world", "preference_rate", True),
    "skill_accuracy": ("world", "skill_accuracy", True),
    "reply_nll": ("reply_nll", "nll_per_token", False),
    "reward": ("reward", "mean", True),
    "win_rate": ("reward", "win_rate_against_base", True),
}
LOWER_IS_BETTER_IN_LM_EVAL = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def higher_is_better(metric: str) -> bool:
    if metric in METRICS:
        return METRICS[metric][2]
    return metric.partition(":")[2] not in LOWER_IS_BETTER_IN_LM_EVAL


def direction(metric: str) -> str:
    return "higher is better" if higher_is_better(metric) else "lower is better"


def check_metric(flag: str, metric: str, measured: set[str], tasks):
    """Refuse, before any model loads, a metric evaluate.py will not measure. measured: the measurements
    asked for ("preference", "world", "reply_nll", "reward"); tasks: --tasks."""
    if ":" in metric:
        task = metric.partition(":")[0]
        if task not in (tasks or []):
            raise UserError(
                f"--{flag} {metric} is a metric of lm-eval task {task}, which --tasks does not run; "
                f"add it to --tasks, or choose another metric"
            )
        return
    if metric not in METRICS:
        raise UserError(
            f"--{flag} {metric} is not a metric evaluate.py measures; choose from "
            f"{', '.join(METRICS)}, or TASK:METRIC for an lm-eval task"
        )
    if METRICS[metric][0] not in measured:
        raise UserError(f"--{flag} {metric} is not measured by this command; {HOW[METRICS[metric][0]]}")


HOW = {
    "preference": "pass held-out pairs with --pairs",
    "world": "it is measured on the built-in world's model alone",
    "reply_nll": "pass conversations with --reply_nll",
    "reward": "pass --prompts with --reward_model",
}


def default_metrics(measured: set[str], tasks) -> tuple[str | None, str | None]:
    """(learned, kept) for what is measured: on the built-in world its preference rate and skill
    accuracy; on real data held-out implicit reward accuracy (or the judged win rate), and the reply NLL (or
    the first lm-eval task's first metric)."""
    learned = next(
        (
            m
            for m, asked in [
                ("preference_rate", "world"),
                ("implicit_reward_accuracy", "preference"),
                ("win_rate", "reward"),
            ]
            if asked in measured
        ),
        None,
    )
    kept = next(
        (m for m, asked in [("skill_accuracy", "world"), ("reply_nll", "reply_nll")] if asked in measured),
        f"{tasks[0]}:" if tasks else None,  # the task's first metric, named once it is measured
    )
    return learned, kept


def lm_eval_key(result: dict, metric: str) -> str:
    """lm-eval's key ("acc,none") of TASK:METRIC in a result; TASK: alone is the task's first metric."""
    task, _, name = metric.partition(":")
    scores = result["lm_eval"][task]
    keys = [k for k in scores if "_stderr" not in k and (not name or k.split(",")[0] == name)]
    if not keys:
        raise UserError(f"lm-eval task {task} gave no metric {name}; it gave {', '.join(scores)}: pass one of those")
    return keys[0]


def value(result: dict, metric: str) -> float:
    """A metric of one point's result (evaluate.py's dict of measurements)."""
    if metric in METRICS:
        measurement, key, _ = METRICS[metric]
        return result[measurement][key]
    return result["lm_eval"][metric.partition(":")[0]][lm_eval_key(result, metric)]


def frontier(points: list[tuple[float, float]], learned: str, kept: str) -> list[bool]:
    """For each (learned, kept) point, whether no other point beats it: at least as good on both
    metrics and better on one."""
    sign = (1 if higher_is_better(learned) else -1, 1 if higher_is_better(kept) else -1)
    oriented = [(sign[0] * x, sign[1] * y) for x, y in points]

    def beats(q, p):
        return q[0] >= p[0] and q[1] >= p[1] and q != p

    return [not any(beats(q, p) for q in oriented) for p in oriented]


def frontier_of(results: list[dict], learned: str, kept: str) -> dict:
    """evaluate.py's results (the base model first, then each point) placed on the two metrics:
    {"learned", "kept", "points": [{"name", "adapter", "scale", "alpha0", "learned", "kept",
    "on_frontier"}]}."""
    for metric in (learned, kept):
        if metric.endswith(":"):  # a task's first metric, by its name
            name = metric + lm_eval_key(results[0], metric).split(",")[0]
            learned, kept = (name, kept) if metric == learned else (learned, name)
    values = [(value(r, learned), value(r, kept)) for r in results]
    points = [
        {key: r[key] for key in ("name", "adapter", "scale", "alpha0")} | {"learned": x, "kept": y, "on_frontier": on}
        for r, (x, y), on in zip(results, values, frontier(values, learned, kept))
    ]
    return {"learned": learned, "kept": kept, "points": points}


def format_table(names: list[str], rows: list[tuple[str, list[float]]]) -> str:
    """A table of numbers with a column per name and a labelled row each: [(label, [value per column])]."""
    widths = [max(8 if i == 0 else 12, len(name) + 2) for i, name in enumerate(names)]
    lines = [f"{'':42}" + "".join(f"{name:>{w}}" for name, w in zip(names, widths))]

    def number(v, w):  # two decimals, or three significant digits for what is too large for them
        return f"{v:{w}.2f}" if abs(v) < 1e4 else f"{v:{w}.3g}"

    lines += [f"{label:42}" + "".join(number(v, w) for v, w in zip(values, widths)) for label, values in rows]
    return "\n".join(lines)


def short_names(names: list[str]) -> list[str]:
    """Each model by its directory's name (the whole path is in the results file), unless two share one."""
    short = [Path(name).name or name for name in names]
    return short if len(set(short)) == len(short) else names


def frontier_table(front: dict) -> str:
    """A row per point in the order measured, * on those no other point beats on both metrics."""
    learned, kept = front["learned"], front["kept"]
    labels = short_names([p["name"] for p in front["points"]])
    rows = [(label, [p["learned"], p["kept"]]) for label, p in zip(labels, front["points"])]
    header, *lines = format_table([learned, kept], rows).splitlines()
    marks = ["  *" if p["on_frontier"] else "" for p in front["points"]]
    return "\n".join(
        [
            f"frontier: {learned} ({direction(learned)}) against {kept} ({direction(kept)}); "
            f"* no other point is as good on both and better on one",
            header,
            *(line + mark for line, mark in zip(lines, marks)),
        ]
    )
