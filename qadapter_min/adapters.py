"""Adapters on disk, as a run writes them: PEFT's LoRA layout, and the run's qadapter_config.json beside it
(policy.py reads them back).

Saved adapters use PEFT's tensor names and adapter_config.json, so peft, vLLM and lm-eval load them:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in_features)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out_features, r)
qadapter_config.json says which policy the adapter defines (objective.Objective) and for which base
model (a fingerprint of its weights), with every flag of the run.
"""

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from qadapter_min.common import atomic_write, full, write_json
from qadapter_min.lora import lora_layers
from qadapter_min.objective import Objective
from qadapter_min.weights import model_fingerprint, ours_to_checkpoint_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "qadapter_config.json"  # which policy the adapter defines, and for which base model


def peft_tensor_name(module_name: str, part: str) -> str:
    """layers.0.self_attn.q_proj + lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return f"base_model.model.{ours_to_checkpoint_name(module_name)}.{part}.weight"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's names, whole, fp32, on the CPU (a collective when they are sharded)."""
    return {
        peft_tensor_name(name, part): full(getattr(layer, part).weight).detach().float().cpu().contiguous()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str = "", tensors: dict | None = None) -> Path:
    """Write adapter_model.safetensors and adapter_config.json (PEFT's LoRA layout) to out_dir; tensors:
    adapter_tensors(model), when they were gathered beforehand (under --fsdp, on every rank)."""
    layers = lora_layers(model)
    assert layers, "the model has no LoRA layers to save"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model) if tensors is None else tensors
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def save_run_config(
    out_dir: Path, model: nn.Module, flags: dict, steps: int, epochs: float, fingerprint: str | None = None
):
    """Write qadapter_config.json: the objective's settings (alpha and alpha0 define the customised
    policy), the base model and a fingerprint of it (an adapter fits only the model it was trained on;
    given when computed beforehand, under --fsdp on every rank), the steps and epochs actually run, and
    every flag of the run."""
    config = Objective.read(flags).config()
    config.update(
        base_model=base_model_record(flags["model"]),
        base_model_fingerprint=fingerprint or model_fingerprint(model),
        steps=steps,
        epochs=round(epochs, 4),
        args=flags,
    )
    write_json(Path(out_dir) / RUN_CONFIG, config)


def base_model_record(model: str) -> str:
    """How an adapter records its base model: a local directory by its absolute path, so that the
    adapter finds it from any working directory; a Hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)
