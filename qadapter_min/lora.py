"""LoRA (Hu et al., 2021) written out, and adapters saved in PEFT's layout.

In Q-Adapter one set of weights plays two parts (docs/method.md):
    adapter on  -> the residual Q-function Q(s, .)  (the logits of W x + (alpha/r) B A x)
    adapter off -> the pre-trained policy pi1       (the logits of W x alone)
so the base model is the same module inside `adapter_disabled(model)`, with no second copy of W.

Saved adapters use PEFT's tensor names and adapter_config.json, so peft, vLLM and lm-eval load them:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in_features)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out_features, r)
"""

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qadapter_min import UserError
from qadapter_min.common import atomic_write, full, read_json_file, write_json
from qadapter_min.objective import OBJECTIVE_SETTINGS
from qadapter_min.weights import model_fingerprint, ours_to_checkpoint_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "qadapter_config.json"  # which policy the adapter defines, and for which base model
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x), with W frozen and A, B trained.

    `weight` is the base layer's own parameter, so its state-dict key is unchanged
    (layers.0.self_attn.q_proj.weight). A starts kaiming-uniform and B at zero, so a fresh adapter
    leaves the model exactly as it was.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype=torch.float32, device=None):
        super().__init__()
        self.weight = base.weight  # (out, in), frozen
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        device = device or base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's and nn.Linear's init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.disabled = False  # True: behave exactly as the base layer
        self.active_rows = None  # a (B,) bool tensor: apply the adapter to these batch rows only
        self.dropout_keys = None  # a (B,) int64 tensor: draw each row's dropout mask from its key (keyed_dropout)
        self.index = 0  # this layer's number in the model, set by add_lora: part of its masks' key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.disabled:
            return out
        # The adapter runs in its own (fp32) dtype; the sum is cast back to the base output's dtype, as PEFT does.
        x = x.to(self.lora_A.weight.dtype)
        if self.training and self.dropout_keys is not None and self.dropout.p > 0:
            x = keyed_dropout(x, self.dropout_keys, self.index, self.dropout.p)
        else:
            x = self.dropout(x)
        update = self.lora_B(self.lora_A(x)) * self.scale
        if self.active_rows is not None:  # (B,) -> (B, 1, ..., 1): rows without the adapter get no update
            update = update * self.active_rows.view(-1, *([1] * (update.dim() - 1)))
        return (out + update).to(out.dtype)


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets=("q_proj", "v_proj"),
    dtype=torch.float32,
    device=None,
) -> nn.Module:
    """Wrap every linear layer named in targets (checkpoint names: q/k/v/o/gate/up/down _proj) in a
    LoRALinear. Afterwards only the LoRA parameters require grad.

    The LoRA weights go on `device` (default: each base weight's own), so a model built on the meta device
    can get real LoRA weights, drawn exactly as on a loaded model (sharding.load_sharded_model)."""
    check_targets(targets)
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, dtype, device))
    if not lora_layers(model):
        raise UserError(f"the model has no layer named {', '.join(targets)} to put LoRA on")
    for index, layer in enumerate(lora_layers(model).values()):
        layer.index = index
    return model


def check_targets(targets):
    """Refuse a LoRA target that is not one of a Llama block's projections."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise UserError(f"LoRA target {unknown[0]!r} is not a projection of a Llama model; choose from {', '.join(PROJECTIONS)}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: layer}, e.g. {"layers.0.self_attn.q_proj": LoRALinear, ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapter_disabled(model: nn.Module):
    """Inside this block the model is exactly the base model (pi1); the adapter comes back afterwards,
    also when the block raises."""
    layers = list(lora_layers(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


@contextmanager
def adapter_on_rows(model: nn.Module, rows: torch.Tensor):
    """Inside this block the adapter acts on the batch rows where `rows` (B,) is True, and the others
    see the base model: one forward computes Q and pi1 side by side, reading the weights once."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.active_rows = rows
    try:
        yield model
    finally:
        for layer in layers:
            layer.active_rows = None


def set_dropout_keys(model: nn.Module, keys: torch.Tensor | None):
    """From now on, training-mode LoRA dropout draws the mask of batch row i from keys[i] (B,), and not
    from torch's random state (None: back to nn.Dropout). The keys stay until the next call, so that the
    backward pass of activation checkpointing, which runs the forward again, draws the same masks."""
    for layer in lora_layers(model).values():
        layer.dropout_keys = keys


# ----------------------------------------------------------------------------------------------------
# Keyed dropout: a mask that is a pure function of (row key, layer, position, feature), the same on every
# device and whatever else shares the batch, so that how a step's pairs are split over processes and
# micro-batches cannot change the adapter. The mask comes from an integer hash, not a random generator.

MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit integers held in int64 (xorshift-multiply rounds); odd multipliers below
    2^31 keep every product below 2^63, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    return x ^ (x >> 16)


def keyed_dropout(x: torch.Tensor, keys: torch.Tensor, layer_index: int, p: float) -> torch.Tensor:
    """Dropout of x (B, T, C) at rate p whose mask element (b, t, c) is hash(keys[b], layer, t, c) >= p 2^32:
    a position's mask does not depend on the padding after it, nor on the other rows."""
    B, T, C = x.shape
    assert keys.shape == (B,), f"{B} rows need {B} dropout keys, got {tuple(keys.shape)}"
    row = mix32(keys.to(x.device) ^ layer_index)  # (B,)
    position = mix32(row[:, None] ^ torch.arange(T, device=x.device))  # (B, T)
    uniform32 = mix32(position[:, :, None] ^ torch.arange(C, device=x.device))  # (B, T, C), uniform in [0, 2^32)
    keep = uniform32 >= int(p * 2**32)
    return x * keep / (1 - p)


def peft_tensor_name(module_name: str, part: str) -> str:
    """layers.0.self_attn.q_proj + lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return f"base_model.model.{ours_to_checkpoint_name(module_name)}.{part}.weight"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's names, whole, fp32, on the CPU (a collective when they are sharded)."""
    return {peft_tensor_name(name, part): full(getattr(layer, part).weight).detach().float().cpu().contiguous()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


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


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = read_json_file(
        path, "pass a directory written by train.py or by peft's save_pretrained", "save the adapter again"
    )
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path} describes a {config.get('peft_type')!r} adapter; qadapter-min loads LoRA adapters")
    return config


def load_adapter(model: nn.Module, adapter_dir, dtype=torch.float32) -> dict:
    """Put a saved adapter (PEFT layout) on the model, adding LoRA layers if it has none. Returns the config."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    if not lora_layers(model):
        add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                 targets=tuple(targets), dtype=dtype)
    layers = lora_layers(model)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a directory written by train.py or by peft's save_pretrained")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            expected = {peft_tensor_name(n, part) for n in layers for part in ("lora_A", "lora_B")}
            if names != expected:
                odd = sorted(names ^ expected)[0]
                raise UserError(
                    f"{path} does not match the model: tensor {odd} is {'missing' if odd in expected else 'unexpected'}; "
                    f"the adapter was made for another model or other LoRA targets"
                )
            for name, layer in layers.items():
                for part in ("lora_A", "lora_B"):
                    tensor = f.get_tensor(peft_tensor_name(name, part))
                    target = getattr(layer, part).weight
                    if tensor.shape != target.shape:
                        raise UserError(
                            f"{path}: {peft_tensor_name(name, part)} has shape {tuple(tensor.shape)}, the model needs "
                            f"{tuple(target.shape)}; the adapter was made for another model"
                        )
                    with torch.no_grad():
                        target.copy_(tensor)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); save the adapter again") from None
    return config


def save_run_config(out_dir: Path, model: nn.Module, flags: dict, steps: int, epochs: float, fingerprint: str | None = None):
    """Write qadapter_config.json: the objective's settings (alpha and alpha0 define the customised
    policy), the base model and a fingerprint of it (an adapter fits only the model it was trained on;
    given when computed beforehand, under --fsdp on every rank), the steps and epochs actually run, and
    every flag of the run."""
    config = {name: flags[name] for name in OBJECTIVE_SETTINGS}
    config.update(base_model=flags["model"], base_model_fingerprint=fingerprint or model_fingerprint(model), steps=steps,
                  epochs=round(epochs, 4), args=flags)
    write_json(Path(out_dir) / RUN_CONFIG, config)


def load_run_config(adapter_dir) -> dict:
    """qadapter_config.json of an output directory of train.py, checked for the keys a reader needs."""
    path = Path(adapter_dir) / RUN_CONFIG
    config = read_json_file(path, "--adapter needs an output directory of train.py", "train the adapter again")
    missing = [key for key in ("objective", "alpha", "alpha0", "base_model", "base_model_fingerprint") if key not in config]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; train the adapter again")
    return config
