"""tools/gpu_check.sh --cpu: the GPU check's every part runs on the CPU, so it is not broken on the day a GPU
comes, and writes both summaries."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cpu_form(out: Path, *flags):
    result = subprocess.run(
        [str(ROOT / "tools" / "gpu_check.sh"), "--cpu", str(out), *flags], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_parts_1_to_3(out: Path, compiled: list[str]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["parts"]) == ["device", "parity", "step", "decoding", *compiled]  # in the order they ran
    assert summary["torch"] and summary["python"] and summary["date"]

    parity = summary["parts"]["parity"]
    assert len(parity["logits"]) == 3
    for numbers in parity["logits"].values():  # bf16 against fp32: close, and not equal (bf16 did run)
        assert 0 < numbers["mean_abs_diff"] < 0.1 and numbers["top1_agreement"] > 0.8
    assert 0 < parity["objective"]["bf16"]["loss_relative_diff"] < 1e-2
    assert len(parity["greedy"]["bf16"]["tokens_before_first_difference"]) == 4

    rows = summary["parts"]["step"]["rows"]
    assert [(r["micro_batch_pairs"], r["gradient_checkpointing"]) for r in rows] == [(1, True), (4, True), (4, False)]
    for row in rows:
        assert row["tokens_per_step"] == 2 * row["micro_batch_pairs"] * 128  # the CPU form's length
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert row["plan_gib"] > 0
    assert rows[0]["plan_gib"] < rows[1]["plan_gib"] < rows[2]["plan_gib"]  # more pairs, then no checkpointing

    decoding = summary["parts"]["decoding"]["rows"]
    assert [(r["policy"], r["batch"]) for r in decoding] == [(p, b) for p in ("base", "customised") for b in (1, 8, 32)]
    assert all(0 < r["of_limit"] and r["tokens_per_s"] > 0 for r in decoding)
    assert [r["gain_over_one_prompt"] for r in decoding if r["batch"] == 1] == [1.0, 1.0]

    text = (out / "summary.md").read_text()
    for heading in ("## 1. Parity", "## 2. Training step", "## 3. Decoding"):
        assert heading in text
    return summary


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--no_compiled", "--compile_backend", "aot_eager"], "--no_compiled leaves part 4 out"),
        (["--minutes", "0"], "--minutes 0: the budget must be more than 0 minutes"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, said):
    result = subprocess.run(
        [str(ROOT / "tools" / "gpu_check.sh"), "--cpu", str(tmp_path / "out"), *flags], capture_output=True, text=True
    )
    assert result.returncode == 2 and said in result.stderr
    assert not (tmp_path / "out").exists()


def test_at_the_budget_the_part_running_stops_with_what_it_finished_and_the_rest_are_left_out(tmp_path):
    """--minutes 0.05: the alarm rings three seconds in, in whichever part is running then (or, rarely,
    as one part ends and the next has not begun: then none is cut and the rest are left out)."""
    result = subprocess.run(
        [str(ROOT / "tools" / "gpu_check.sh"), "--cpu", str(tmp_path), "--minutes", "0.05"]
        + ["--compile_backend", "aot_eager"],
        capture_output=True,
        text=True,
    )
    parts = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert list(parts) == ["device", "parity", "step", "decoding", "compiled"]
    states = ["cut" if "error" in p else "left out" if "left_out" in p else "done" for p in parts.values()]
    done = states.count("done")
    cut = list(parts)[done : done + 1] if states[done : done + 1] == ["cut"] else []
    left_out = list(parts)[done + len(cut) :]
    assert states == ["done"] * done + ["cut"] * len(cut) + ["left out"] * len(left_out)
    assert cut or left_out
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
        "the 0.05-minute budget (--minutes) ran out"
        + "".join(f" in {name}" for name in cut)
        + (f", leaving out {', '.join(left_out)}" if left_out else "")
        + " (the summaries hold what finished)"
    )
    text = (tmp_path / "summary.md").read_text()
    for name in cut:
        assert parts[name]["error"] == "OutOfTime: stopped at the 0.05-minute budget (--minutes)"
        assert f"**{name} stopped** after" in text
    for name in left_out:
        assert f"**{name} left out**: the 0.05-minute budget was spent" in text


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # part 4's graphs captured, run with PyTorch's kernels: seconds
        pytest.param("inductor", marks=pytest.mark.slow),  # --compile's: 2.5 minutes on 2 cores
    ],
)
def test_the_cpu_form_runs_every_part_and_writes_both_summaries(tmp_path, backend):
    run_cpu_form(tmp_path, "--compile_backend", backend)
    summary = check_parts_1_to_3(tmp_path, compiled=["compiled"])
    rows = summary["parts"]["step"]["rows"]
    compiled = summary["parts"]["compiled"]
    assert "error" not in compiled, compiled
    assert [(r["policy"], r["batch"], r["compiled"]) for r in compiled["rows"]] == [
        (p, b, True) for p in ("base", "customised") for b in (1, 32)
    ]
    assert all(r["tokens_per_s"] > 0 and r["first_call_s"] > 0 for r in compiled["rows"])
    step = compiled["step"]
    assert step["step_ms"] > 0 and step["eager_step_ms"] == rows[2]["step_ms"]

    assert compiled["backend"] == backend
    text = (tmp_path / "summary.md").read_text()
    assert "## 4. Compiled" in text and f"torch.compile backend: {backend}" in text
