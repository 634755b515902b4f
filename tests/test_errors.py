"""Bad input: one sentence naming the file or flag and the fix, a non-zero exit, no traceback, no output."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
import train
from conftest import run_script, tiny_model_dir, typed, write_pairs
from qadapter_min import UserError, step

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_file):
    directory = tmp_path_factory.mktemp("errors")
    return tiny_model_dir(directory / "model", tokenizer_file), write_pairs(directory / "pairs.jsonl", n=8)


def broken_model(world, tmp_path, breakage):
    model_dir = Path(shutil.copytree(world[0], tmp_path / "broken-model"))
    breakage(model_dir)
    return model_dir


def remove(name):
    return lambda model_dir: (model_dir / name).unlink()


def set_config(**changes):
    def change(model_dir):
        config = json.loads((model_dir / "config.json").read_text())
        config.update(changes)
        (model_dir / "config.json").write_text(json.dumps(config))

    return change


def reshape_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, model_dir / "model.safetensors")


def truncate_weights(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def data_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_DATA = {  # file name, contents, what the message must say
    "missing": ("absent.jsonl", None, r"absent\.jsonl does not exist"),
    "malformed": (
        "broken.jsonl",
        '{"chosen": [], "rejected": []}\n{"chosen": \n',
        r"broken\.jsonl: malformed JSON at line 2",
    ),
    "unknown format": (
        "odd.jsonl",
        '{"prompt": "a", "completion": "b"}\n',
        r"odd\.jsonl: line 1 is in no known preference format",
    ),
    "nothing usable": (
        "empty-replies.jsonl",
        json.dumps(
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            }
        )
        + "\n",
        r"empty-replies\.jsonl holds no usable preference pair \(1 empty reply\)",
    ),
    "empty file": ("nothing.jsonl", "", r"nothing\.jsonl holds no usable preference pair \(it is empty\)"),
    "dsp without domain": (
        "dsp.json",
        json.dumps([{"query": "q", "responses": {"academy": "a"}}]),
        r"dsp\.json: record 1 is DSP data, which needs a domain: pass --domain",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_sentence_and_leaves_no_output(world, tmp_path, case):
    name, text, message = BAD_DATA[case]
    path = tmp_path / name if text is None else data_file(tmp_path, name, text)
    expect_refusal(["--model", world[0], "--data", path, "--batch_size", 4], message, tmp_path)


BAD_MODELS = {
    "no config.json": (remove("config.json"), r"config\.json does not exist"),
    "no tokenizer.json": (remove("tokenizer.json"), r"tokenizer\.json does not exist"),
    "not llama": (set_config(model_type="gpt2"), r"config\.json describes a 'gpt2' model"),
    "unknown rope": (
        set_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
        r"rope_type 'yarn' is not supported",
    ),
    "wrong shape": (reshape_tensor, r"tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \(3, 3\)"),
    "truncated weights": (truncate_weights, r"model\.safetensors is not a readable safetensors file"),
    "no weights": (
        remove("model.safetensors"),
        r"holds neither model\.safetensors nor model\.safetensors\.index\.json",
    ),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_bad_model_is_one_sentence_and_leaves_no_output(world, tmp_path, case):
    breakage, message = BAD_MODELS[case]
    expect_refusal(
        ["--model", broken_model(world, tmp_path, breakage), "--data", world[1], "--batch_size", 4], message, tmp_path
    )


def expect_refusal(flags, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as refused:
        train.main([str(f) for f in flags] + ["--out", str(out), "--max_steps", "2"])
    assert "\n" not in str(refused.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "absent.jsonl"], "absent.jsonl does not exist"),
        (["--batch_size", "5", "--micro_batch_size", "2"], "--batch_size 5 is not a multiple"),
    ],
)
def test_the_script_prints_one_line_and_exits_2(world, tmp_path, flags, message):
    model_dir, data = world
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        *flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout.count("\n") <= 2  # at most the data summary lines
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_any_work(world, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(UserError, match=r"--out .*out is a file; pass a directory"):
        train.main(["--model", str(world[0]), "--data", str(world[1]), "--out", str(tmp_path / "out")])


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(world, tmp_path):
    expect_refusal(
        ["--model", broken_model(world, tmp_path, set_config(vocab_size=100)), "--data", world[1], "--batch_size", 4],
        r"tokenizer\.json has \d+ tokens but config\.json's vocab_size is 100",
        tmp_path,
    )


def test_checkpoints_are_kept_from_a_fresh_start_and_a_damaged_one_is_named(world, tmp_path):
    out = tmp_path / "out"
    flags = ["--model", str(world[0]), "--data", str(world[1]), "--out", str(out)]
    flags += "--batch_size 4 --max_steps 3".split()
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match="holds a checkpoint of another run; pass --resume"):
        train.main(flags)
    with pytest.raises(UserError, match=r"state\.pt cannot be read"):
        train.main(flags + ["--resume"])
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoint", "state.pt"]  # nothing written, nothing lost


def test_sample_py_refuses_a_directory_without_an_adapter(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/ here: sample.py without flags reads the built-in run's ./out
    for flags in (["--adapter", str(tmp_path)], []):
        result = run_script(sample.main, *flags, "--prompt", "hi")
        assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "qadapter_config.json does not exist" in run_script(sample.main, "--adapter", str(tmp_path)).stderr


def test_non_finite_losses_skip_the_update_and_three_in_a_row_stop_the_run(world, tmp_path, monkeypatch):
    real_loss = step.loss_from_hidden
    calls = []

    def loss_that_goes_bad(*args, **kwargs):
        calls.append(1)
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * math.nan if len(calls) >= 2 else loss), metrics  # step 1 is fine, then NaN forever

    monkeypatch.setattr(step, "loss_from_hidden", loss_that_goes_bad)
    model_dir, data = world
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not finite for 3 steps in a row \\(up to step 4\\); lower --lr"):
        flags = ["--model", model_dir, "--data", data, "--out", out, "--batch_size", 4, "--micro_batch_size", 4]
        train.main(typed(*flags, "--max_steps", 10))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None] + ["non-finite loss or gradient"] * 3
    assert not (out / "adapter_model.safetensors").exists()


def test_under_torchrun_a_refusal_ends_every_rank_with_a_non_zero_exit(world, tmp_path):
    model_dir, data = world
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--batch_size",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.count("error: --batch_size 3 is not a multiple of --micro_batch_size (1) x 2 processes") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, error",
    [
        (["--batch_size", "3"], "--batch_size 3 is not a multiple of --micro_batch_size (1) x 2 processes"),
        (["--max_len", "5000"], "--max_len 5000 is beyond the model's context of 1024 tokens"),
    ],
    ids=["checked-before-the-processes-start", "found-by-every-process"],
)
def test_with_nproc_per_node_a_refusal_is_the_one_line_printed_and_ends_every_process(world, tmp_path, case, error):
    model_dir, data = world
    command = [sys.executable, str(ROOT / "train.py"), "--nproc_per_node", "2"]
    flags = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out")]
    result = subprocess.run(command + flags + case, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {error}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_process_that_fails_is_named_and_the_others_are_stopped(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys, time\n"
        "from qadapter_min.processes import start_processes\n"
        "if os.environ.get('RANK') == '1':\n"
        "    sys.exit(3)\n"
        "if 'RANK' in os.environ:\n"
        "    time.sleep(60)\n"
        "start_processes(2)\n"
    )
    started = time.time()
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 3 and time.time() - started < 40
    assert result.stderr == ("error: rank 1 failed (exit code 3), its output is above; the others were stopped\n")
