"""train.py's contract for every script: an output that could not be written, or a flag that would
change nothing, is refused in one sentence before any model or data loads.

REFUSALS is the one table of bad command lines, every script's: each must print one line, "error: ..."
holding the sentence's key words, exit 2, and write nothing."""

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


@pytest.fixture(scope="module")
def runs(world):
    """A Q-Adapter and a DPO adapter of world's model, one step each: what evaluate.py and sample.py read."""
    model_dir, data, directory = world
    for objective in ("qadapter", "dpo"):
        flags = ["--model", model_dir, "--data", data, "--out", directory / objective, "--batch_size", 4]
        assert run_script(train.main, *flags, "--max_steps", 1, "--objective", objective).returncode == 0
    return directory / "qadapter", directory / "dpo"


TRAIN = "train --model {model} --data {data} --batch_size 4 --max_steps 2 --out {tmp}/out"
EVALUATE = "evaluate --output {tmp}/results.json"
ON_PAIRS = f"{EVALUATE} --adapter {{qadapter}} --pairs {{data}}"
REFUSALS = {  # case: (script and arguments, the sentence's key words: one or several); {tmp}: the case's directory
    "batch not divisible": (f"{TRAIN} --batch_size 6 --micro_batch_size 4", "--batch_size 6 is not a multiple"),
    "batch larger than the data": (f"{TRAIN} --batch_size 64", "--batch_size 64 is larger than the 8 usable pairs"),
    "max_len too small": (f"{TRAIN} --max_len 20", "--max_len 20 is too small for any pair"),
    "unknown lora target": (f"{TRAIN} --lora_targets qkv_proj", "LoRA target 'qkv_proj' is not a projection"),
    "negative learning rate": (f"{TRAIN} --lr -1", "--lr must be > 0, got -1.0"),
    "dropout of one": (f"{TRAIN} --lora_dropout 1", "--lora_dropout must be in [0, 1)"),
    "unknown domain": (f"{TRAIN} --domain sports", "--domain 'sports' is not a DSP domain"),
    "resume without checkpoint": (f"{TRAIN} --resume", "checkpoint/state.pt does not exist"),
    "data is a directory": (f"{TRAIN} --data /", "/ is a directory; pass a preference data file"),
    "beta with dpo": (
        f"{TRAIN} --objective dpo --beta 0.5",
        ("--beta is a setting of --objective qadapter", "drop --beta"),
    ),
    "alpha0 with dpo": (
        f"{TRAIN} --objective dpo --alpha0 0.2",
        ("--alpha0 is a setting of --objective qadapter", "drop --alpha0"),
    ),
    "chi2 with sft": (
        f"{TRAIN} --objective sft --chi2 bellman",
        ("--chi2 is a setting of --objective qadapter", "drop --chi2"),
    ),
    "dpo_beta with sft": (
        f"{TRAIN} --objective sft --dpo_beta 0.5",
        ("--dpo_beta is a setting of --objective dpo", "drop --dpo_beta"),
    ),
    "dpo_beta with qadapter": (
        f"{TRAIN} --dpo_beta 0.5",
        ("--dpo_beta is a setting of --objective dpo", "drop --dpo_beta"),
    ),
    "sample batch of 0": ("sample --adapter {qadapter} --prompt hi --batch_size 0", "--batch_size must be > 0, got 0"),
    "sample negative alpha0": (
        "sample --adapter {qadapter} --prompt hi --alpha0 -1",
        "--alpha0 must be >= 0, got -1.0",
    ),
    "sample top_p of 0": ("sample --adapter {qadapter} --prompt hi --top_p 0", "--top_p must be in (0, 1], got 0.0"),
    "sample top_p before the model": ("sample --model x --top_p 0 --prompt hi", "--top_p must be in (0, 1], got 0.0"),
    "sample prompt and prompts": (
        "sample --model {model} --prompt hi --prompts p.jsonl --out {tmp}/r.jsonl",
        "not both",
    ),
    "sample compare without adapter": ("sample --model {model} --compare --prompt hi", "--compare prints the base"),
    "sample batch without prompts": ("sample --model {model} --batch_size 4 --prompt hi", "--batch_size sets how many"),
    "evaluate not an adapter": (f"{EVALUATE} --adapter {{model}}", "{model}/qadapter_config.json does not exist"),
    "evaluate empty pairs": (
        f"{EVALUATE} --adapter {{qadapter}} --pairs {{tmp}}/empty.jsonl",
        "empty.jsonl holds no usable",
    ),
    "evaluate missing pairs": (
        f"{EVALUATE} --adapter {{qadapter}} --pairs {{tmp}}/no.jsonl",
        "{tmp}/no.jsonl does not exist",
    ),
    "evaluate output is a directory": ("evaluate --adapter {qadapter} --output {tmp}", "--output {tmp} is a directory"),
    "evaluate missing replies": (
        f"{EVALUATE} --adapter {{qadapter}} --reply_nll {{tmp}}/no.jsonl",
        "--reply_nll {tmp}/no",
    ),
    "evaluate negative scale": (f"{ON_PAIRS} --scale 1 -0.5", "--scale must be finite and >= 0, got -0.5"),
    "evaluate infinite scale": (f"{ON_PAIRS} --scale inf", "--scale must be finite and >= 0, got inf"),
    "evaluate negative alpha0": (f"{ON_PAIRS} --alpha0 -1", "--alpha0 must be finite and >= 0, got -1.0"),
    "evaluate alpha0 without a Q-Adapter": (
        f"{EVALUATE} --adapter {{dpo}} --pairs {{data}} --alpha0 0.1 1",
        "--alpha0 sets the weight of log pi1 in a Q-Adapter's policy, and no --adapter is a Q-Adapter",
    ),
    "evaluate scale without an adapter": (
        f"{EVALUATE} --model {{model}} --pairs {{data}} --scale 0 1",
        "--scale scales",
    ),
    "evaluate plot without a second metric": (
        f"{ON_PAIRS} --plot {{tmp}}/f.png",
        "--plot draws one metric of what was learned against one of what was kept, and this command "
        "measures nothing for --kept",
    ),
    "evaluate plot in a missing directory": (f"{ON_PAIRS} --plot {{tmp}}/no/f.png", "the directory {tmp}/no does not"),
    "evaluate plot not a png": (f"{ON_PAIRS} --plot {{tmp}}/f.pdf", "--plot {tmp}/f.pdf is not a .png file"),
    "evaluate unknown metric": (
        f"{ON_PAIRS} --kept retention",
        "--kept retention is not a metric evaluate.py measures",
    ),
    "evaluate metric not measured": (
        f"{ON_PAIRS} --kept reply_nll",
        "--kept reply_nll is not measured by this command",
    ),
}
MAINS = {"train": train.main, "sample": sample.main, "evaluate": evaluate.main}


@pytest.mark.parametrize("case", REFUSALS)
def test_every_scripts_refusals_are_one_sentence_with_exit_2_and_nothing_written(world, runs, tmp_path, case):
    model_dir, data, _ = world
    places = dict(model=model_dir, data=data, qadapter=runs[0], dpo=runs[1], tmp=tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    command, words = REFUSALS[case]
    script, *argv = command.format(**places).split()
    message = refused(MAINS[script], *argv)
    assert all(w.format(**places) in message for w in ([words] if isinstance(words, str) else words)), message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.jsonl"]  # nothing written


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
