"""Write tests/fixtures/lm-eval-llama/: a tiny Llama and a LoRA adapter written by transformers and peft, and
the per-request scores that lm-eval's own Hugging Face backend gives them on the tasks of tests/lm_eval_tasks/.

The test suite checks evaluate.py's lm-eval model against these numbers without transformers or peft. To
regenerate (on a machine of your own; neither is a dependency of qadapter-min), from the repository root:

    python -m venv /tmp/xcheck --system-site-packages && /tmp/xcheck/bin/pip install transformers peft
    HF_DATASETS_OFFLINE=1 /tmp/xcheck/bin/python tools/make_lm_eval_golden.py

Written:
    model/       config.json, model.safetensors (save_pretrained), tokenizer.json (a Llama-3-style BPE whose
                 post-processor puts <|begin_of_text|> first, as Llama 3's does) and tokenizer_config.json
    adapter/     adapter_config.json, adapter_model.safetensors (peft's save_pretrained; LoRA on q_proj and
                 v_proj with random B, so the adapter changes the model), and the qadapter_config.json that
                 marks it a DPO adapter of that model for evaluate.py
    golden.json  {"base" | "adapter": {task: {doc_id: [[log-likelihood, is_greedy], ...] per request, or
                 the reply text}}} from lm-eval's samples, fp32
"""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qadapter_min.weights import load_model, model_fingerprint  # noqa: E402
from toyworld.build import train_llama3_style_tokenizer  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "lm-eval-llama"
TASKS = ROOT / "tests" / "lm_eval_tasks"
QUESTIONS = 8  # the hand-written documents of tiny_mc.jsonl; the greedy ones after them are this tool's
CORPUS = (TASKS / "tiny_mc.jsonl").read_text().splitlines()[:QUESTIONS] + [
    "Question: Answer: The capital of Peru is Lima. The opposite of big is small.",
    "Write this word in upper case: river. In upper case: RIVER",
]


def write_tokenizer(model_dir: Path) -> int:
    path = model_dir / "tokenizer.json"
    train_llama3_style_tokenizer(CORPUS * 20, path, vocab_size=700)
    tokenizer = HFTokenizer.from_file(str(path))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    tokenizer.save(str(path))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": "<|eot_id|>",
                "model_max_length": 256,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    return tokenizer.get_vocab_size(with_added_tokens=True)


def write_model(model_dir: Path, vocab_size: int):
    torch.manual_seed(0)
    special = HFTokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id
    # generation stops at the end of the text, of a tool message or of a turn, as Llama 3.1's does
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=500000.0,
        bos_token_id=special("<|begin_of_text|>"),
        tie_word_embeddings=False,
        eos_token_id=[special("<|end_of_text|>"), special("<|eom_id|>"), special("<|eot_id|>")],
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    model.save_pretrained(model_dir)
    return model


def write_adapter(model, adapter_dir: Path, model_dir: Path):
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "README.md").unlink()  # peft's model-card template
    (adapter_dir / "qadapter_config.json").write_text(
        json.dumps(
            {
                "objective": "dpo",
                "alpha": 1.0,
                "alpha0": 0.01,
                "beta": 0.1,
                "gamma": 1.0,
                "dpo_beta": 0.1,
                "base_model": str(model_dir.relative_to(ROOT)),
                "base_model_fingerprint": model_fingerprint(load_model(model_dir)),
            },
            indent=2,
        )
    )
    return peft_model.eval()


def add_greedy_docs(model, tokenizer, docs_path: Path):
    """Append to the multiple-choice data a question whose right choice is the model's own greedy next token
    (one for the base model, one for the adapter), so that lm-eval's greedy flags are not all False."""
    docs = [json.loads(line) for line in docs_path.read_text().splitlines()][:QUESTIONS]
    questions = [f"Say word number {i}." for i in range(400)]
    for adapter_on in (False, True):
        for question in questions:
            context = f"Question: {question}\nAnswer:"
            ids = tokenizer(context)["input_ids"]
            with torch.no_grad(), nullcontext() if adapter_on else model.disable_adapter():
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            choice = tokenizer.decode([token])
            # lm-eval scores " " + choice after the context: the token must be that, and tokenize back to itself
            if choice.startswith(" ") and choice.strip() and tokenizer(context + choice)["input_ids"] == ids + [token]:
                docs.append({"question": question, "choices": ["Lima", choice[1:]], "answer": 1})
                questions.remove(question)
                break
    docs_path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def golden_scores(model_args: dict) -> dict:
    out = simple_evaluate(
        model="hf",
        model_args={**model_args, "dtype": "float32"},
        tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
        batch_size=3,
        device="cpu",
    )
    return {task: {str(s["doc_id"]): s["resps"] for s in samples} for task, samples in out["samples"].items()}


def main():
    model_dir, adapter_dir = OUT / "model", OUT / "adapter"
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(model_dir)
    peft_model = write_adapter(write_model(model_dir, vocab_size), adapter_dir, model_dir)
    add_greedy_docs(peft_model, AutoTokenizer.from_pretrained(model_dir), TASKS / "tiny_mc.jsonl")
    golden = {
        "base": golden_scores({"pretrained": str(model_dir)}),
        "adapter": golden_scores({"pretrained": str(model_dir), "peft": str(adapter_dir)}),
    }
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1))
    print(sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*") if p.is_file()))


if __name__ == "__main__":
    main()
