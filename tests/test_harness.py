"""evaluate.py's lm-eval model against lm-eval's own Hugging Face backend, and the customised policy's scores
against the definition, on local tasks (tests/lm_eval_tasks/) and a checkpoint and adapter written by
transformers and peft (tests/fixtures/lm-eval-llama/, by tools/make_lm_eval_golden.py)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-eval tests need requirements-eval.txt")

import evaluate  # noqa: E402
import sample  # noqa: E402
from qadapter_min import UserError  # noqa: E402
from qadapter_min import compiled as compiled_steps  # noqa: E402
from qadapter_min.harness import PolicyLM, cut_at_first  # noqa: E402
from qadapter_min.lora import adapter_disabled  # noqa: E402
from qadapter_min.objective import policy_logits  # noqa: E402
from qadapter_min.policy import (
    BASE,  # noqa: E402
    load_adapter,  # noqa: E402
)
from qadapter_min.tokenizer import Tokenizer  # noqa: E402
from qadapter_min.weights import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lm-eval-llama"
MODEL, ADAPTER = FIXTURE / "model", FIXTURE / "adapter"
TASK_FLAGS = ["--include_path", "tests/lm_eval_tasks", "--log_samples", "--batch_size", "3"]


@pytest.fixture(autouse=True)
def offline_in_the_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files from the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_evaluate(tmp_path, *flags) -> list[dict]:
    evaluate.main([*map(str, flags), *TASK_FLAGS, "--output", str(tmp_path / "results.json")])
    return json.loads((tmp_path / "results.json").read_text())["models"]


def test_scores_and_replies_equal_those_of_lm_evals_hugging_face_backend(tmp_path):
    golden = json.loads((FIXTURE / "golden.json").read_text())
    base, adapter = run_evaluate(
        tmp_path, "--model", MODEL, "--adapter", ADAPTER, "--tasks", "tiny_mc", "tiny_ppl", "tiny_gen"
    )
    assert adapter["policy"] == "adapter"  # a DPO adapter: the adapter-on model
    for result, expected in ((base, golden["base"]), (adapter, golden["adapter"])):
        for task in ("tiny_mc", "tiny_ppl"):
            for sample_ in result["samples"][task]:
                want = expected[task][str(sample_["doc_id"])]
                for (got,), (hf,) in zip(sample_["resps"], want, strict=True):
                    if task == "tiny_mc":
                        assert got[0] == pytest.approx(hf[0], abs=1e-4) and got[1] == hf[1]
                    else:
                        assert got == pytest.approx(hf, abs=1e-4)
        replies = {str(s["doc_id"]): s["resps"] for s in result["samples"]["tiny_gen"]}
        assert replies == expected["tiny_gen"]  # greedy replies, cut at the first "until" string
    greedy = [r[0][1] for s in adapter["samples"]["tiny_mc"] for r in s["resps"]]
    assert any(greedy) and not all(greedy)


def test_with_compile_the_generated_replies_are_still_lm_evals_own(tmp_path, monkeypatch):
    """evaluate.py --compile decodes through the compiled step: under aot_eager here, which captures
    the graphs --compile compiles (tests/test_compiled.py runs inductor too)."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_steps, "BACKEND", "aot_eager")
    torch._dynamo.utils.counters.clear()
    golden = json.loads((FIXTURE / "golden.json").read_text())
    base, adapter = run_evaluate(tmp_path, "--model", MODEL, "--adapter", ADAPTER, "--tasks", "tiny_gen", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the base, the adapter
    for result, expected in ((base, golden["base"]), (adapter, golden["adapter"])):
        replies = {str(s["doc_id"]): s["resps"] for s in result["samples"]["tiny_gen"]}
        assert replies == expected["tiny_gen"]
    torch._dynamo.reset()


def test_a_q_adapter_scores_every_continuation_under_the_customised_policy(tmp_path):
    qadapter = tmp_path / "qadapter"
    shutil.copytree(ADAPTER, qadapter)
    config = json.loads((qadapter / "qadapter_config.json").read_text())
    (qadapter / "qadapter_config.json").write_text(json.dumps({**config, "objective": "qadapter", "alpha": 0.5}))
    model = load_model(MODEL)
    load_adapter(model, qadapter)
    tokenizer = Tokenizer(MODEL)
    for alpha0 in (None, 0.7):  # as trained (0.01), and overridden
        results = run_evaluate(
            tmp_path,
            "--model",
            MODEL,
            "--adapter",
            qadapter,
            "--tasks",
            "tiny_mc",
            *([] if alpha0 is None else ["--alpha0", alpha0]),
        )
        assert results[1]["policy"] == "customised"
        for sample_ in results[1]["samples"]["tiny_mc"]:
            for (context, continuation), ((got, _),) in zip(sample_["arguments"], sample_["resps"]):
                context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
                ids = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
                with torch.no_grad():
                    q = model.eval()(torch.tensor([ids]))[0]
                    with adapter_disabled(model):
                        base = model(torch.tensor([ids]))[0]
                log_pi = policy_logits(q, base, 0.5, 0.01 if alpha0 is None else alpha0).log_softmax(-1)
                expected = sum(log_pi[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids)))
                assert got == pytest.approx(expected, abs=1e-5, rel=1e-6)  # fp32 rounding: sums reach -30


def test_generate_until_gives_sample_pys_greedy_replies_cut_at_the_first_until_string(tmp_path, capsys):
    _, adapter = run_evaluate(
        tmp_path, "--model", MODEL, "--adapter", ADAPTER, "--tasks", "tiny_gen", "--apply_chat_template"
    )
    capsys.readouterr()
    for sample_ in adapter["samples"]["tiny_gen"]:
        question = sample_["doc"]["question"]
        sample.main(
            [
                "--model",
                str(MODEL),
                "--adapter",
                str(ADAPTER),
                "--prompt",
                f"Question: {question}\nAnswer:",
                "--temperature",
                "0",
                "--max_new_tokens",
                "12",
            ]
        )
        reply = re.sub(
            r"<\|[a-z_0-9]+\|>", "", capsys.readouterr().out.removesuffix("\n")
        )  # lm-eval's text omits special tokens
        assert sample_["resps"] == [[cut_at_first(reply, ["\n", "."])]]


def test_a_chat_templated_string_tokenizes_to_exactly_encode_chats_ids():
    tokenizer = Tokenizer(MODEL)
    lm = PolicyLM(load_model(MODEL), tokenizer, BASE, name="tiny")
    for messages in (
        [{"role": "user", "content": "Question: What is two plus two?\nAnswer:"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And the capital of Peru?"},
        ],
    ):
        assert lm.tok_encode(lm.apply_chat_template(messages)) == tokenizer.encode_chat(
            messages, add_generation_prompt=True
        )
    # without the generation prompt lm-eval continues the last (assistant) message: no <|eot_id|> after it
    prefill = [{"role": "user", "content": "Say a word."}, {"role": "assistant", "content": "The word is"}]
    assert (
        lm.tok_encode(lm.apply_chat_template(prefill, add_generation_prompt=False))
        == tokenizer.encode_chat(prefill)[:-1]
    )


@pytest.mark.slow  # out of CI's six minutes: python -m pytest -m slow
def test_an_unknown_task_is_refused_before_any_model_is_loaded():  # lm-eval's whole index: 15 s
    with pytest.raises(UserError, match="^Tasks not found: no_such_task; "):
        evaluate.main(["--model", "nowhere", "--tasks", "tiny_mc", "no_such_task", *TASK_FLAGS])


def test_a_missing_lm_eval_is_refused_before_any_model_is_loaded(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.tasks", None)  # as if lm-eval were not installed
    with pytest.raises(
        UserError,
        match="^--tasks runs lm-evaluation-harness, which is not installed: pip install -r requirements-eval.txt",
    ):
        evaluate.main(["--model", "nowhere", "--tasks", "tiny_mc"])


def test_a_task_whose_data_file_is_nowhere_is_one_sentence(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (ROOT / "tests" / "lm_eval_tasks" / "tiny_mc.yaml").read_text()
    (tasks / "tiny_mc.yaml").write_text(yaml.replace("tests/lm_eval_tasks/", "missing/"))
    flags = ["--model", str(MODEL), "--tasks", "tiny_mc", "--include_path", str(tasks)]
    with pytest.raises(UserError, match=r"^--tasks tiny_mc: .*missing/tiny_mc\.jsonl.*; a task YAML of"):
        evaluate.main(flags)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_one_or_two_processes_give_lm_evals_numbers_from_any_directory(tmp_path, processes):
    """The task YAMLs copied elsewhere, naming their data file beside themselves, and run from a third
    directory: each finds its data there; two processes split the requests."""
    golden = json.loads((FIXTURE / "golden.json").read_text())
    tasks = shutil.copytree(ROOT / "tests" / "lm_eval_tasks", tmp_path / "tasks")
    for yaml in tasks.glob("*.yaml"):
        yaml.write_text(yaml.read_text().replace("tests/lm_eval_tasks/tiny_mc.jsonl", "tiny_mc.jsonl"))
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--nproc_per_node",
            str(processes),
            "--model",
            str(MODEL),
            "--adapter",
            str(ADAPTER),
            "--tasks",
            "tiny_mc",
            "tiny_gen",
            "--include_path",
            str(tasks),
            "--log_samples",
            "--batch_size",
            "3",
            "--output",
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path / "elsewhere",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for model, expected in zip(
        json.loads((tmp_path / "two.json").read_text())["models"], (golden["base"], golden["adapter"])
    ):
        samples = model["samples"]  # with two processes, gathered from both
        assert sorted(s["doc_id"] for s in samples["tiny_mc"]) == sorted(map(int, expected["tiny_mc"]))
        for sample_ in samples["tiny_mc"]:
            for (got,), (hf,) in zip(sample_["resps"], expected["tiny_mc"][str(sample_["doc_id"])], strict=True):
                assert got[0] == pytest.approx(hf[0], abs=1e-4) and got[1] == hf[1]
        assert {str(s["doc_id"]): s["resps"] for s in samples["tiny_gen"]} == expected["tiny_gen"]
    assert result.stdout.count("tiny_mc acc") == 1  # rank 0 alone prints the table
