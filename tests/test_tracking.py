"""train.py --wandb_project: every metrics row reaches Weights & Biases at its step, with the run's
flags as its config, read back from the offline run's file (wandb's own record format, parsed here)."""

import json
import struct
import sys

import pytest

import train
from conftest import run_script, tiny_model_dir, write_pairs


def wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte file header, then LevelDB's log format (32 KiB
    blocks of chunks, each a 7-byte header: checksum, length, type 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_every_metrics_row_goes_to_wandb_at_its_step_with_the_flags_as_config(tmp_path, tokenizer_file, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model_dir = tiny_model_dir(tmp_path / "model", tokenizer_file)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
    flags = ["--model", model_dir, "--data", pairs, "--eval_data", pairs, "--batch_size", 2]
    flags += ["--max_steps", 3, "--eval_every", 2, "--out", tmp_path / "out"]
    train.main([str(f) for f in [*flags, "--wandb_project", "p", "--wandb_run_name", "tiny"]])

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items.pop("_step"), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":  # the run's name and project, and its config: the flags
            assert (record.run.project, record.run.display_name) == ("p", "tiny")
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for row in rows:
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    assert history.keys() == expected.keys() == {1, 2, 3}
    for step, numbers in expected.items():
        assert history[step] == pytest.approx(numbers), step  # eval rows at their step too
    assert config["batch_size"] == 2 and config["wandb_project"] == "p"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--wandb_run_name", "n"], "--wandb_run_name names a run of --wandb_project"),
        (["--wandb_project", "p"], "--wandb_project logs to Weights & Biases, which is not installed"),
    ],
)
def test_tracking_that_cannot_start_is_refused_before_any_work(tmp_path, tokenizer_file, monkeypatch, flags, message):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    model_dir = tiny_model_dir(tmp_path / "model", tokenizer_file)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
    base = ["--model", str(model_dir), "--data", str(pairs), "--out", str(tmp_path / "out")]
    result = run_script(train.main, *base, *flags)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert not (tmp_path / "out").exists()
