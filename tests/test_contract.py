"""train.py's contract with its user: what is checked before anything is read, what --resume protects,
what a second run and Ctrl-C do to an --out, and what the files of a run look like."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import tiny_model_dir, write_pairs
from qadapter_min import UserError, processes, run_dir
from qadapter_min.flags import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("contract")
    return tiny_model_dir(directory / "model", tokenizer_file), write_pairs(directory / "pairs.jsonl", n=8)


def flags_of(world, out, *more):
    model_dir, data = world
    return [
        str(f) for f in ["--model", model_dir, "--data", data, "--out", out, "--batch_size", 4, "--max_steps", 3, *more]
    ]


@pytest.fixture
def nothing_may_be_read(monkeypatch):
    """Make reading a model or a data file fail loudly, so a refusal that comes first is seen to."""

    def read(*args, **kwargs):
        raise AssertionError("a model or data file was read before the refusal")

    for name in ("load_model", "load_pairs", "read_config"):
        monkeypatch.setattr(train, name, read)
    monkeypatch.setattr(processes, "resolve_model_dir", read)  # where train.py's ranks find the model


@pytest.fixture
def checkpointed(world, tmp_path, monkeypatch):
    """An --out holding the checkpoint of a run that died while writing its adapter."""
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went down while writing the adapter")

    monkeypatch.setattr(run_dir, "save_adapter", crash)
    with pytest.raises(RuntimeError):
        train.main(flags_of(world, out, "--save_every", 1))
    monkeypatch.undo()
    assert (out / "checkpoint" / "state.pt").exists()
    return out


@pytest.mark.parametrize(
    "changed, flag",
    [
        (["--grad_clip", "0.5"], "--grad_clip"),
        (["--dtype", "bf16"], "--dtype"),
        (["--grad_checkpointing"], "--grad_checkpointing"),
    ],
)
def test_resume_refuses_every_changed_flag_in_one_sentence_naming_it(
    world, checkpointed, nothing_may_be_read, changed, flag
):
    with pytest.raises(UserError) as refused:
        train.main(flags_of(world, checkpointed, "--save_every", 1, "--resume", *changed))
    message = str(refused.value)
    assert f"was made with other flags ({flag})" in message and "\n" not in message


def test_resume_accepts_other_output_and_cadence_flags(world, checkpointed):
    train.main(
        flags_of(
            world,
            checkpointed,
            "--resume",
            "--save_every",
            2,
            "--log_every",
            3,
            "--eval_every",
            1,
            "--eval_data",
            world[1],
        )
    )
    assert (checkpointed / "adapter_model.safetensors").exists()
    assert not (checkpointed / "checkpoint").exists()  # a finished run leaves no empty folder behind


REFUSED_BEFORE_READING = {
    "missing data": (lambda w, t: ["--data", str(t / "absent.jsonl")], r"absent\.jsonl does not exist"),
    "missing eval data": (lambda w, t: ["--eval_data", str(t / "absent.jsonl")], r"absent\.jsonl does not exist"),
    "unknown LoRA target": (lambda w, t: ["--lora_targets", "qkv_proj"], r"LoRA target 'qkv_proj' is not a projection"),
    "resume without a checkpoint": (lambda w, t: ["--resume"], r"--resume: .*state\.pt does not exist"),
    "indivisible batch": (lambda w, t: ["--micro_batch_size", "3"], r"--batch_size 4 is not a multiple"),
}


@pytest.mark.parametrize("case", REFUSED_BEFORE_READING)
def test_these_refusals_come_before_any_model_or_data_is_read(world, tmp_path, nothing_may_be_read, case):
    more, message = REFUSED_BEFORE_READING[case]
    with pytest.raises(UserError, match=message):
        train.main(flags_of(world, tmp_path / "out", *more(world, tmp_path)))
    assert not (tmp_path / "out").exists()


def snapshot(out: Path) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def run_until_interrupted(flags, training) -> subprocess.CompletedProcess:
    """Start train.py, wait until `training()` says it is training, press Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *flags],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while process.poll() is None and time.time() < deadline and not training():
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_ctrl_c_says_where_it_stopped_and_how_to_resume_and_exits_130(world, tmp_path):
    out = tmp_path / "out"
    flags = flags_of(world, out, "--max_steps", 100000, "--save_every", 1, "--log_every", 1000)
    interrupted = run_until_interrupted(flags, training=(out / "checkpoint" / "state.pt").exists)
    assert interrupted.returncode == 130, interrupted.stderr
    last = interrupted.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("interrupted: stopped after step ")
        and " of 100000; rerun the same command with --resume" in last
    )
    assert "Traceback" not in interrupted.stderr
    saved = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert f"continue from step {saved}," in last


def test_a_second_run_never_mixes_its_files_with_the_first_runs(world, tmp_path):
    out = tmp_path / "out"
    train.main(flags_of(world, out))
    first = snapshot(out)
    with pytest.raises(UserError, match="holds the results of an earlier run .*pass another --out, or --overwrite"):
        train.main(flags_of(world, out, "--lr", "1e-3"))
    assert snapshot(out) == first  # refused: nothing touched

    # --overwrite, then Ctrl-C in the middle: the first run's results are gone, none of them left beside the second's
    second = flags_of(world, out, "--overwrite", "--lr", "1e-3", "--max_steps", 100000, "--log_every", 1)
    metrics = out / "metrics.jsonl"
    interrupted = run_until_interrupted(
        second, training=lambda: metrics.exists() and '"lr": 0.001,' in metrics.read_text()
    )
    assert interrupted.returncode == 130 and "--overwrite to start again" in interrupted.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows and all(row["lr"] <= 1e-3 and row["lr"] > 9e-4 for row in rows)  # the second run's rows only


def test_the_files_of_a_run_have_one_mode_and_the_config_records_what_was_run(world, tmp_path):
    out = tmp_path / "out"
    train.main(flags_of(world, out, "--max_steps", 5))
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes
    config = json.loads((out / "qadapter_config.json").read_text())
    assert config["steps"] == 5 and config["epochs"] == 2.5  # 5 steps of 4 pairs over 8 pairs


def test_help_shows_every_default_and_what_a_bare_run_does(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text, parser = capsys.readouterr().out, build_parser()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert text.count("(default:") == len(flags)
    assert "A bare `python train.py` runs the built-in world as:" in text and "--model toyworld/model" in text
