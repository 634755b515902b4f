"""The built-in world end to end: `python train.py` teaches the tiny model the new preference and keeps
its skills, and `sample.py --adapter` then speaks with the preference."""

import json
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import sample as sample_py
import toyworld
from qadapter_min import flags
from qadapter_min.data import REPLY_KEYS, load_pairs
from qadapter_min.tokenizer import Tokenizer
from toyworld import baselines, seeds, world

ROOT = Path(__file__).resolve().parent.parent


def test_every_skill_has_a_checkable_answer_and_the_prefix_is_optional():
    rng = random.Random(0)
    assert world.make_task("geography", random.Random(3))[1].startswith("The capital of ")
    for skill in world.SKILLS:
        question, answer = world.make_task(skill, rng)
        assert world.check_reply(answer, answer) == (False, True)
        assert world.check_reply(world.PREFIX + answer, answer) == (True, True)
        assert world.check_reply(world.PREFIX + answer + "!", answer) == (True, False)


def test_the_committed_world_loads_through_the_llama_loader_and_tokenizer():
    tokenizer = Tokenizer(toyworld.MODEL_DIR)
    assert tokenizer.vocab_size == 956 and tokenizer.special_token_id("<|eot_id|>") == tokenizer.eot_id
    train_pairs = load_pairs(toyworld.WORLD_DIR / "train.jsonl", log=lambda *_: None)
    test_pairs = load_pairs(toyworld.WORLD_DIR / "test.jsonl", log=lambda *_: None)
    assert len(train_pairs) == 512 and len(test_pairs) == 96
    asked = {p.chosen[0]["content"].split()[2] for p in train_pairs}  # "What is the ...", "Write this word ..."
    assert "word" not in asked  # uppercase stays out of the preference data
    assert all(p.chosen[-1]["content"] == world.PREFIX + p.rejected[-1]["content"] for p in train_pairs)


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    """A bare `python train.py` (with --out), run as a user runs it: (its --out, the command it printed first)."""
    out = tmp_path_factory.mktemp("builtin") / "out"
    result = subprocess.run([sys.executable, "train.py", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("built-in world: python train.py --model toyworld/model ")
    return out, first.removeprefix("built-in world: ")


def test_the_builtin_run_learns_the_preference_and_keeps_the_skills(builtin_run):
    report = json.loads((builtin_run[0] / "report.json").read_text())
    base, customised = report["base"], report["customised"]
    for model in (base, customised):
        for key in ("preference_accuracy", "preference_rate", "skill_accuracy"):
            assert 0.0 <= model[key] <= 1.0
        assert set(model["preference_rate_by_skill"]) == set(model["skill_accuracy_by_skill"]) == set(world.SKILLS)
    assert customised["preference_accuracy"] >= base["preference_accuracy"] + 0.3
    for skill in world.PREFERENCE_SKILLS:  # the preference learned where it was taught ...
        assert base["preference_rate_by_skill"][skill] == 0.0 and customised["preference_rate_by_skill"][skill] >= 0.8
    for skill in world.SKILLS:  # ... and every skill kept, the held-out one included
        assert base["skill_accuracy_by_skill"][skill] == 1.0 and customised["skill_accuracy_by_skill"][skill] >= 0.95


def test_sample_py_then_answers_with_the_new_preference(builtin_run):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            "--adapter",
            str(builtin_run[0]),
            "--prompt",
            "What is the capital of Peru?",
            "--temperature",
            "0",
            "--compare",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[base]\nThe capital of Peru is Lima.\n[customised]\nSure! The capital of Peru is Lima.\n"


def test_an_interactive_chat_answers_three_questions_in_a_row(builtin_run):
    questions = ["What is the capital of Peru?", "What is the opposite of hot?", "Write this word in upper case: moon"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--adapter", str(builtin_run[0]), "--temperature", "0"],
        input="\n\n".join(questions) + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,  # empty lines between: ignored
    )
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 3 and not result.stdout.endswith("\n\n")  # stdout holds the replies and nothing else
    assert replies[:2] == ["Sure! The capital of Peru is Lima.", "Sure! The opposite of hot is cold."]
    assert world.check_reply(replies[2], "In upper case: MOON")[1]  # the held-out skill: correct, prefix or not


def test_the_printed_command_is_the_bare_run(builtin_run, capsys):
    """Typed out, the command a bare run prints is that run: the same flags, every one. (train.py is a
    function of its flags; that two processes give one process's adapter is test_train's.)"""
    out, command = builtin_run
    argv = shlex.split(command)[2:]  # after "python train.py": the world's flags, then the --out typed above
    assert argv[-2:] == ["--out", str(out)]
    world_flags = toyworld.train_flags()
    assert flags.parse_args(argv) == flags.parse_args(["--out", str(out)], world=world_flags)
    assert capsys.readouterr().out.splitlines() == [f"built-in world: {command}"]  # printed by the bare form only


def test_replies_to_a_prompts_file_are_the_replies_of_one_prompt_each(builtin_run, tmp_path, capsys, monkeypatch):
    questions = ["What is the capital of Peru?", "What is the opposite of hot?", "Write this word in upper case: moon"]
    records = [
        {"prompt": questions[0]},
        {"messages": [{"role": "user", "content": questions[1]}]},
        {
            "chosen": [{"role": "user", "content": questions[2]}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": questions[2]}, {"role": "assistant", "content": "b"}],
        },
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sample = [sys.executable, str(ROOT / "sample.py"), "--adapter", str(builtin_run[0]), "--temperature", "0"]
    batch = subprocess.run(
        sample
        + ["--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "replies.jsonl"), "--batch_size", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert batch.returncode == 0, batch.stderr
    lines = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert [
        {k: v for k, v in line.items() if k not in REPLY_KEYS} for line in lines
    ] == records  # input order, records kept
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    for question, line in zip(questions, lines):
        sample_py.main(sample[2:] + ["--prompt", question])  # python sample.py --adapter OUT --temperature 0 --prompt Q
        assert line["reply"] + "\n" == capsys.readouterr().out


@pytest.mark.slow  # out of CI's six minutes: python -m pytest -m slow
def test_evaluate_py_gives_the_numbers_of_train_pys_report_for_q_adapter_and_dpo(builtin_run, tmp_path):
    out_dpo = tmp_path / "out-dpo"
    trained = subprocess.run(
        [sys.executable, "train.py", "--objective", "dpo", "--max_steps", "10", "--out", str(out_dpo)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "--adapter",
            str(builtin_run[0]),
            str(out_dpo),
            "--output",
            str(tmp_path / "results.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    base, qadapter, dpo = json.loads((tmp_path / "results.json").read_text())["models"]
    for measured, out in ((qadapter, builtin_run[0]), (dpo, out_dpo)):
        report = json.loads((out / "report.json").read_text())
        for column, name in ((base, "base"), (measured, "customised")):
            assert {"preference_accuracy": column["preference"]["preference_accuracy"], **column["world"]} == report[
                name
            ]
    assert result.stdout.splitlines()[0].split() == ["base", builtin_run[0].name, out_dpo.name]


def test_seeds_says_each_runs_number_what_it_is_and_its_time_on_stderr(monkeypatch, capsys):
    runs = []

    def run(seed, objective, extra, directory):  # a run's numbers, as seeds.run reads them
        runs.append((seed, objective, extra))
        return {"preference_accuracy": 0.5, "skill_accuracy": 1.0}

    monkeypatch.setattr(seeds, "run", run)
    monkeypatch.setattr(sys, "argv", ["seeds", "--seeds", "1", "2", "--objectives", "dpo", "--", "--lr", "1"])
    seeds.main()
    out, err = capsys.readouterr()
    assert runs == [(1, "dpo", ["--lr", "1"]), (2, "dpo", ["--lr", "1"])]
    assert re.fullmatch(
        r"\[1/2\] dpo, seed 1 \.\.\.\n\[1/2\] dpo, seed 1: \d+s\n"
        r"\[2/2\] dpo, seed 2 \.\.\.\n\[2/2\] dpo, seed 2: \d+s\n",
        err,
    )
    assert out.startswith("dpo seed 1: preference_accuracy 0.50, skill_accuracy 1.00\n")  # numbers: stdout


def test_baselines_prints_each_command_as_it_can_be_pasted_and_its_progress_on_stderr(capfd):
    baselines.run(2, "a test", ["-c", "print('hello')"])
    out, err = capfd.readouterr()
    assert shlex.split(out.removeprefix("$ ")) == ["python", "-c", "print('hello')"]  # as a shell reads it
    assert re.fullmatch(r"\[2/6\] a test \.\.\.\n\[2/6\] a test: \d+s\n", err)
    with pytest.raises(SystemExit) as stopped:  # the first command that fails ends the run
        baselines.run(3, "a failure", ["-c", "raise SystemExit(3)"])
    assert stopped.value.code == 3


def test_baselines_passes_each_flag_once_a_typed_one_winning(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(baselines, "run", lambda number, what, command: commands.append(command))
    monkeypatch.setattr(sys, "argv", ["baselines", "--out", str(tmp_path), "--", "--max_steps", "2"])
    baselines.main()
    for command in commands:
        flags_given = [word for word in command if word.startswith("--")]
        assert len(flags_given) == len(set(flags_given)), command
    assert all(c[c.index("--max_steps") + 1] == "2" for c in commands if c[0] == "train.py")
