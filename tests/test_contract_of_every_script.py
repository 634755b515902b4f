"""train.py's contract for every script: an output that could not be written, or a flag that would
change nothing, is refused in one sentence before any model or data loads."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import evaluate
import sample
import toyworld
import train
from conftest import run_script, tiny_model_dir, write_pairs
from qadapter_min import flags, memory, processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("contract")
    model_dir = tiny_model_dir(directory / "model", tokenizer_file)
    return model_dir, write_pairs(directory / "pairs.jsonl", n=8), directory


@pytest.fixture
def nothing_may_load(monkeypatch):
    """Make loading a model or reading a data file fail loudly, so a refusal that comes first shows."""

    def load(*args, **kwargs):
        raise AssertionError("a model or data file was read before the refusal")

    for module, name in ((train, "load_model"), (train, "load_pairs"), (evaluate, "load_model")):
        monkeypatch.setattr(module, name, load)
    monkeypatch.setattr(processes.Processes, "resolve_model_dir", load)


def refused(main, *flags) -> str:
    """The one line a refused command prints; it must exit 2 and print nothing else."""
    result = run_script(main, *flags)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_an_output_path_that_could_not_be_written_is_refused_before_any_work(world, tmp_path, nothing_may_load):
    model_dir, data, _ = world
    (tmp_path / "a-file").write_text("")
    message = refused(evaluate.main, "--model", model_dir, "--pairs", data, "--output", tmp_path / "no/x/r.json")
    assert "--output" in message and "does not exist" in message
    message = refused(evaluate.main, "--model", model_dir, "--output", tmp_path / "a-file/r.json")
    assert "--output" in message and "is a file, not a directory" in message
    message = refused(train.main, "--model", model_dir, "--data", data, "--out", tmp_path / "a-file/sub")
    assert "--out" in message and "is a file, not a directory" in message
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
    "objective, flag, value",
    [
        ("dpo", "--beta", "0.5"),
        ("dpo", "--alpha0", "0.2"),
        ("sft", "--chi2", "bellman"),
        ("sft", "--dpo_beta", "0.5"),
        ("qadapter", "--dpo_beta", "0.5"),
    ],
)
def test_a_flag_of_another_objective_is_refused_by_name(world, objective, flag, value):
    model_dir, data, _ = world
    message = refused(train.main, "--model", model_dir, "--data", data, "--objective", objective, flag, value)
    assert f"{flag} is a setting of --objective" in message and f"drop {flag}" in message


def test_a_domain_for_data_without_dsp_records_is_refused(world, tmp_path):
    model_dir, data, _ = world
    message = refused(train.main, "--model", model_dir, "--data", data, "--domain", "academy", "--out", tmp_path)
    assert "--domain academy" in message and "holds none; drop --domain" in message
    assert not any(tmp_path.iterdir())


def test_a_max_len_beyond_the_models_context_is_refused(world, tmp_path):
    model_dir, data, _ = world
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    flags = ["--model", model_dir, "--data", data, "--out", tmp_path / "out"]
    message = refused(train.main, *flags, "--max_len", context + 1)
    assert f"--max_len {context + 1} is beyond the model's context of {context} tokens" in message


def test_a_plan_larger_than_the_devices_memory_is_warned_of_before_the_first_step(world, tmp_path, monkeypatch):
    model_dir, data, _ = world
    monkeypatch.setattr(memory, "device_memory_gib", lambda device: 1e-6)
    flags = ["--model", model_dir, "--data", data, "--out", tmp_path / "out", "--batch_size", 4]
    result = run_script(train.main, *flags, "--max_steps", 1)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "more than the 0.0 GiB of cpu memory here" in warning[0]
    assert result.stdout.index("memory per rank") < result.stdout.index("step 1/1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "hi", "--prompts", "p.jsonl", "--out", "r.jsonl"], "not both"),
        (["--compare", "--prompt", "hi"], "--compare prints the base model's reply"),
        (["--batch_size", "4", "--prompt", "hi"], "--batch_size sets how many prompts"),
    ],
)
def test_sample_py_refuses_a_flag_that_would_change_nothing(world, flags, message):
    model_dir, _, _ = world
    assert message in refused(sample.main, "--model", model_dir, *flags)


def test_evaluate_py_with_nothing_to_measure_is_refused(world, nothing_may_load):
    model_dir, _, _ = world
    assert "nothing to measure" in refused(evaluate.main, "--model", model_dir)


def test_reply_files_are_utf8_and_mark_a_reply_cut_by_max_new_tokens(world, tmp_path):
    model_dir, _, _ = world
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"Smile {i} 😊, café"} for i in range(6)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "replies.jsonl"
    flags = ["--model", model_dir, "--prompts", prompts, "--out", out, "--temperature", 1]
    assert run_script(sample.main, *flags, "--max_new_tokens", 1).returncode == 0
    text = out.read_text(encoding="utf-8")
    assert "😊, café" in text and "\\u" not in text  # written as UTF-8, not escaped
    records = [json.loads(line) for line in text.splitlines()]
    # one new token at most: a reply that stopped is empty, any other was cut by --max_new_tokens
    assert [r["finish_reason"] for r in records] == ["stop" if r["reply"] == "" else "length" for r in records]


def test_long_work_reports_its_progress_on_stderr_and_leaves_stdout_to_the_results(world, tmp_path):
    model_dir, data, _ = world
    flags = ["--model", model_dir, "--data", data, "--eval_data", data, "--batch_size", 4]
    result = run_script(train.main, *flags, "--max_steps", 1, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "evaluation: 8/8 micro-batches" in result.stderr  # 8 eval pairs, one per micro-batch
    assert "micro-batches" not in result.stdout
    result = run_script(evaluate.main, "--model", model_dir, "--pairs", data)
    assert result.returncode == 0, result.stderr
    assert "base: preference: 8/8 pairs" in result.stderr and "pairs," not in result.stdout
    assert result.stdout.startswith(" ") and "preference accuracy (held out)" in result.stdout


def test_a_lone_surrogate_in_a_prompts_file_is_refused_naming_the_line(world, tmp_path):
    model_dir, _, _ = world
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "hi \\ud83d there"}\n')
    flags = ["--model", model_dir, "--prompts", prompts, "--out", tmp_path / "r.jsonl"]
    assert "line 2 holds text that is not valid Unicode" in refused(sample.main, *flags)
    assert not (tmp_path / "r.jsonl").exists()


def test_resume_on_a_finished_run_says_it_is_finished(world, tmp_path):
    model_dir, data, _ = world
    flags = ["--model", model_dir, "--data", data, "--out", tmp_path, "--batch_size", 4]
    assert run_script(train.main, *flags, "--max_steps", 1).returncode == 0
    assert "is finished" in refused(train.main, *flags, "--max_steps", 1, "--resume")


def test_a_dpo_run_logs_no_chi2_term(world, tmp_path):
    model_dir, data, _ = world
    flags = ["--model", model_dir, "--data", data, "--out", tmp_path, "--batch_size", 4]
    assert run_script(train.main, *flags, "--max_steps", 1, "--objective", "dpo").returncode == 0
    [row] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "chi2_loss" not in row and {"loss", "pref_loss", "preference_accuracy"} <= set(row)


def test_the_built_in_line_shows_each_flag_once_with_the_typed_value(capsys):
    flags.parse_args(["--batch_size", "8", "--lora_targets", "q_proj", "--out", "x"], world=toyworld.train_flags())
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("built-in")]
    words = line.split()
    assert words.count("--batch_size") == 1 and words[words.index("--batch_size") + 1] == "8"
    assert words.count("--lora_targets") == 1 and words[words.index("--lora_targets") + 1 :] == ["q_proj", "--out", "x"]


@pytest.mark.slow  # out of CI's six minutes: python -m pytest -m slow
def test_an_lm_eval_dataset_out_of_reach_is_one_sentence_not_a_traceback(world):
    """Offline (as the datasets library is told to be here), a Hub task's data cannot be fetched."""
    model_dir, _, _ = world
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "evaluate.py"), "--model", str(model_dir)]
    result = subprocess.run([*command, "--tasks", "hellaswag", "--limit", "1"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --tasks hellaswag: lm-eval could not fetch a task's dataset")
    )


def test_the_eta_counts_the_evaluations_still_to_come():
    """10 steps, 4 done at 2 s each, evaluations after steps 5 and 10 (--eval_every 5): 6 steps left
    at 2 s and 2 evaluations, at the 3 s the first took, or, before any, guessed at a third of training
    on as many pairs (48 pairs = 3 steps of 16 at 2 s, / 3 = 2 s)."""
    args = SimpleNamespace(eval_every=5, batch_size=16)
    steps, eval_set = range(0, 10), [None] * 48
    assert train.eta_seconds(steps, 4, 8.0, 3.0, 1, eval_set, args) == 6 * 2 + 2 * 3
    assert train.eta_seconds(steps, 4, 8.0, 0.0, 0, eval_set, args) == 6 * 2 + 2 * 2
    assert train.eta_seconds(steps, 4, 8.0, 0.0, 0, [], args) == 6 * 2  # no eval data: no evaluation
