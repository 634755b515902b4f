"""export.py: the merged checkpoint gives what transformers + peft give with the adapter (numbers that
tools/make_export_golden.py wrote with both libraries; transformers' own load of an export gives peft's
merge exactly), holds one tensor of the base at a time, and refuses bad input before writing."""

import json
import shlex
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import export
import train
from conftest import run_script, tiny_model_dir, write_pairs
from qadapter_min import flags as flags_module
from qadapter_min import merge
from qadapter_min.data import collate, encode_pairs, load_pairs
from qadapter_min.lora import adapter_disabled
from qadapter_min.policy import load_adapter
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import INDEX_FILE, SINGLE_FILE, load_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = load_file(FIXTURES / "export" / "golden.safetensors")
CASES = {
    "dpo-single": (FIXTURES / "lm-eval-llama" / "model", FIXTURES / "lm-eval-llama" / "adapter"),
    "qadapter-sharded": (FIXTURES / "tiny-llama-untied-sharded", FIXTURES / "export" / "qadapter-adapter"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_export_gives_the_logits_of_transformers_and_peft_with_the_adapter(case, tmp_path, capsys):
    base, adapter = CASES[case]
    out = tmp_path / "merged"
    export.main(["--adapter", str(adapter), "--model", str(base), "--out", str(out)])
    assert_merged_weights_are_exact_to_fp32(base, adapter, load_file(out / SINGLE_FILE))
    merged = load_model(out).eval()  # a plain model: no adapter, no LoRA layers
    with torch.no_grad():
        logits = merged(GOLDEN[f"{case}.tokens"])
    # how far fp32 takes peft itself from the fp64 logits: 1.1e-5 and 1.4e-5 here, on logits that reach 7.3
    fp32_error = (GOLDEN[f"{case}.logits"].double() - GOLDEN[f"{case}.exact_logits"]).abs().max()
    assert fp32_error < 2e-5
    # peft's own merge, W + (alpha/r) B A in fp32: the same weights, so the same logits but for the order
    # in which this CPU's kernels sum (the golden file's CPU gave equal ones; another, 4.5e-6 apart)
    torch.testing.assert_close(logits, GOLDEN[f"{case}.merged_logits"], atol=fp32_error, rtol=0)
    # peft with the adapter unmerged, W x + (alpha/r) B (A x): as close as fp32 allows
    assert (logits.double() - GOLDEN[f"{case}.logits"]).abs().max() < 1e-5 + fp32_error
    assert (logits.double() - GOLDEN[f"{case}.exact_logits"]).abs().max() < 2e-5
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    said = capsys.readouterr().out
    assert ("a Q-Adapter adapter: the export is softmax(Q)" in said) == case.startswith("qadapter")


def assert_merged_weights_are_exact_to_fp32(base: Path, adapter: Path, exported: dict):
    """Each merged projection is W + (alpha/r) B A in fp64 but for fp32's rounding: within (r + 1) units
    of fp32's half-epsilon of |W| + (alpha/r) |B| |A|, the bound of r products summed and one sum."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale, r = config["lora_alpha"] / config["r"], config["r"]
    lora = load_file(adapter / "adapter_model.safetensors")
    base_weights = {k: v for f in base.glob("*.safetensors") for k, v in load_file(f).items()}
    half_eps = torch.finfo(torch.float32).eps / 2
    merged = 0
    for key, A in lora.items():
        if ".lora_A." not in key:
            continue
        B = lora[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.", ".")
        W = base_weights[name].double()
        exact = W + scale * (B.double() @ A.double())
        bound = (r + 1) * half_eps * (W.abs() + scale * (B.double().abs() @ A.double().abs()))
        assert ((exported[name].double() - exact).abs() <= bound).all(), name
        merged += 1
    assert merged == len(lora) // 2 and merged > 0


def test_shards_of_at_most_max_shard_size_with_transformers_index(tmp_path):
    base, adapter = CASES["qadapter-sharded"]
    out = tmp_path / "merged"
    export.main(["--adapter", str(adapter), "--out", str(out), "--max_shard_size", "40KB"])
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted({file for file in index["weight_map"].values()})
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    tensors = {}
    for file in files:
        shard = load_file(out / file)
        assert set(shard) == {n for n, f in index["weight_map"].items() if f == file}
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= 40_000 or len(shard) == 1
        tensors.update(shard)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    single = tmp_path / "single"
    export.main(["--adapter", str(adapter), "--out", str(single)])
    assert load_file(single / SINGLE_FILE).keys() == tensors.keys()
    for name, tensor in load_file(single / SINGLE_FILE).items():
        assert torch.equal(tensor, tensors[name]), name  # the same bytes, however the files split


def test_one_tensor_of_the_base_is_held_at_a_time(tmp_path, monkeypatch):
    """Every tensor read from the base is gone before the next is read (the adapter's, small, are kept)."""
    alive, reads = [], []
    opened = export.open_safetensors

    class Counting:
        def __init__(self, path):
            self.file, self.of_the_base = opened(path), "adapter" not in Path(path).name

        def __enter__(self):
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            tensor = self.handle.get_tensor(name)
            if self.of_the_base:
                reads.append(sum(r() is not None for r in alive))
                alive.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(export, "open_safetensors", Counting)  # the base's norm, for its fingerprint
    monkeypatch.setattr(merge, "open_safetensors", Counting)  # every tensor, merged
    base, adapter = CASES["qadapter-sharded"]
    export.main(["--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert len(reads) == 1 + 21 and set(reads) == {0}  # the norm (the fingerprint's), then each once


@pytest.mark.parametrize("case", ["not an adapter", "out exists", "another base", "bad shard size", "pairs for dpo"])
def test_bad_input_is_one_sentence_and_nothing_is_written(case, tmp_path):
    base, adapter = CASES["dpo-single"]
    out = tmp_path / "merged"
    flags, message = {
        "not an adapter": (["--adapter", str(base)], f"{base}/qadapter_config.json does not exist"),
        "out exists": (["--adapter", str(adapter)], f"--out {out} already exists"),
        "another base": (
            ["--adapter", str(adapter), "--model", str(CASES["qadapter-sharded"][0])],
            f"{adapter} was trained on another base model than",
        ),
        "bad shard size": (
            ["--adapter", str(adapter), "--max_shard_size", "big"],
            "--max_shard_size big is not a size",
        ),
        "pairs for dpo": (
            ["--adapter", str(adapter), "--pairs", str(adapter / "qadapter_config.json")],
            "--pairs measures how far a Q-Adapter's export is from its policy pi~",
        ),
    }[case]
    if case == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("earlier work")
    result = run_script(export.main, *flags, "--out", str(out))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["merged"] if case == "out exists" else [])
    if case == "out exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_export_is_a_base_model_for_train_py(tmp_path):

    base, adapter = CASES["dpo-single"]
    export.main(["--adapter", str(adapter), "--model", str(base), "--out", str(tmp_path / "merged")])
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    flags = ["--model", tmp_path / "merged", "--data", data, "--batch_size", 2, "--max_steps", 1]
    flags += ["--max_len", 128]
    train.main([str(f) for f in [*flags, "--out", tmp_path / "stage-two"]])
    config = json.loads((tmp_path / "stage-two" / "qadapter_config.json").read_text())
    assert config["base_model"] == str(tmp_path / "merged")


def test_export_json_holds_the_kl_from_pi_tilde_to_the_export_of_the_formula(tmp_path, tokenizer_file):

    model_dir = tiny_model_dir(tmp_path / "model", tokenizer_file)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
    flags = ["--model", model_dir, "--data", pairs, "--batch_size", 2, "--max_steps", 3, "--lr", 0.05]
    train.main([str(f) for f in [*flags, "--alpha0", 0.5, "--out", tmp_path / "qadapter"]])
    out = tmp_path / "merged"
    export.main(["--adapter", str(tmp_path / "qadapter"), "--out", str(out), "--pairs", str(pairs)])
    measured = json.loads((out / "export.json").read_text())

    # the definition, token by token: pi~ = softmax((Q + alpha0 log pi1) / alpha) against softmax(Q)

    tokenizer = Tokenizer(model_dir)
    encoded = encode_pairs(load_pairs(pairs, log=print), tokenizer, 1024, log=print)
    model = load_model(model_dir)
    load_adapter(model, tmp_path / "qadapter")
    kls = []
    with torch.no_grad():
        ids, mask = collate(encoded, tokenizer.pad_id)
        q = model.eval()(ids)
        with adapter_disabled(model):
            log_pi1 = model(ids).log_softmax(-1)
    for row in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[row, t]:
                pi = torch.softmax(q[row, t - 1] + 0.5 * log_pi1[row, t - 1], -1)  # alpha 1
                kls.append(float((pi * (pi.log() - q[row, t - 1].log_softmax(-1))).sum()))
    assert measured["tokens"] == len(kls) and measured["pairs"] == len(encoded)
    assert measured["kl_customised_to_exported"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert measured["kl_customised_to_exported"] > 1e-4  # at alpha0 0.5 the two differ


def test_a_run_and_its_export_carry_a_model_card_that_says_what_they_are(tmp_path, tokenizer_file):
    model_dir = tiny_model_dir(tmp_path / "model", tokenizer_file)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
    run = tmp_path / "run"
    flags = ["--model", model_dir, "--data", pairs, "--eval_data", pairs, "--batch_size", 2]
    flags += ["--max_steps", 2, "--beta", 0.3, "--out", run]
    train.main([str(f) for f in flags])
    card = (run / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {model_dir}\nlibrary_name: peft\ntags:\n")
    assert "- qadapter\n---\n" in card and "beta 0.3" in card
    assert f"`python sample.py --adapter {run}`" in card and "softmax(Q) instead" in card
    assert f"- data: {pairs} (4 pairs used)" in card and "- steps: 2 of 2 pairs (1.00 epochs)" in card
    assert "- last metrics (step 2): loss " in card and "- last evaluation (step 2): eval_loss " in card
    made_by = card.split("```\n")[1].strip()  # the command, typed again, is the run
    argv = shlex.split(made_by)[2:]
    assert flags_module.parse_args(argv) == flags_module.parse_args([str(f) for f in flags])

    export.main(["--adapter", str(run), "--out", str(tmp_path / "merged")])
    merged_card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "This merged model is softmax(Q) alone" in merged_card
