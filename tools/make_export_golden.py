"""Write tests/fixtures/export/: what transformers and peft compute for two adapters on their base models,
against which the tests check export.py's merged checkpoints without either library.

    python -m venv /tmp/xcheck --system-site-packages && /tmp/xcheck/bin/pip install transformers peft
    /tmp/xcheck/bin/python tools/make_export_golden.py

The two cases:
    dpo-single        tests/fixtures/lm-eval-llama/: its single-file base and its DPO adapter (peft's)
    qadapter-sharded  tests/fixtures/tiny-llama-untied-sharded/ (three shards), and an adapter peft writes
                      here (export/qadapter-adapter/): LoRA on all seven projections, A and B random, marked
                      a Q-Adapter adapter of that base by its qadapter_config.json
Written: export/golden.safetensors, "{case}.tokens", "{case}.logits" (fp32) of the base with the adapter
through peft, "{case}.merged_logits" of peft's own merge (merge_and_unload, fp32) and "{case}.exact_logits"
(peft in fp64). Then each case is exported by export.py and loaded back by transformers'
LlamaForCausalLM.from_pretrained, and the largest differences are printed.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qadapter_min.weights import load_model, model_fingerprint  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "export"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qadapter_adapter(base: Path, out: Path):
    """A peft adapter on all seven projections with random A and B, and the qadapter_config.json that makes
    it a Q-Adapter adapter of base for qadapter-min."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    run = {
        "objective": "qadapter",
        "alpha": 1.0,
        "alpha0": 0.01,
        "beta": 0.1,
        "gamma": 1.0,
        "chi2": "authors",
        "dpo_beta": 0.1,
        "base_model": str(base.relative_to(ROOT)),
        "base_model_fingerprint": model_fingerprint(load_model(base)),
    }
    (out / "qadapter_config.json").write_text(json.dumps(run, indent=2) + "\n")


def peft_logits(base: Path, adapter: Path, tokens: torch.Tensor, dtype=torch.float32):
    """Logits of the base with the adapter through peft, and of peft's merge of the two."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(model, adapter).eval()
        logits = with_adapter(tokens).logits
        return logits, with_adapter.merge_and_unload()(tokens).logits


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases = {
        "dpo-single": (FIXTURES / "lm-eval-llama" / "model", FIXTURES / "lm-eval-llama" / "adapter"),
        "qadapter-sharded": (FIXTURES / "tiny-llama-untied-sharded", OUT / "qadapter-adapter"),
    }
    qadapter_adapter(*cases["qadapter-sharded"])
    golden = {}
    for case, (base, adapter) in cases.items():
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
        golden[f"{case}.tokens"] = tokens
        golden[f"{case}.logits"], golden[f"{case}.merged_logits"] = peft_logits(base, adapter, tokens)
        golden[f"{case}.exact_logits"] = peft_logits(base, adapter, tokens, torch.float64)[0]
        with tempfile.TemporaryDirectory() as directory:
            exported = Path(directory) / "merged"
            export = [sys.executable, "export.py", "--adapter", str(adapter), "--out", str(exported)]
            subprocess.run([*export, "--max_shard_size", "40KB"], cwd=ROOT, check=True)
            merged = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = merged(tokens).logits
        for what, key, reference in [
            ("transformers on the export", "logits", logits),
            ("transformers on the export", "merged_logits", logits),
            ("peft in fp32", "exact_logits", golden[f"{case}.logits"]),
        ]:
            difference = (reference.double() - golden[f"{case}.{key}"]).abs().max().item()
            print(f"{case}: {what} against {key}: {difference:.2e}")
    save_file({k: v.contiguous() for k, v in golden.items()}, OUT / "golden.safetensors")


if __name__ == "__main__":
    main()
