"""Load a Llama checkpoint straight from Hugging Face files: config.json plus safetensors.

    load_model("meta-llama/Llama-3.1-8B-Instruct", dtype=torch.bfloat16, device="cuda")
    load_model("path/to/model_dir")

The model is built on the meta device (no memory), then every tensor is read from the safetensors
files one at a time, cast to the target dtype on the target device and assigned in place
(`load_state_dict(assign=True)`): peak memory stays near one copy of the weights in the target dtype,
and an 8B model loaded in bf16 never passes through fp32.
"""

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qadapter_min import UserError
from qadapter_min.common import full, read_json_file
from qadapter_min.model import ModelArgs, Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What a Hub download fetches: config, tokenizer, safetensors; never the original/*.pth consolidated weights.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model*.safetensors",
    "model.safetensors.index.json",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(path_or_repo_id: str | os.PathLike) -> Path:
    """A local model directory as it is, or a Hub repo id downloaded (or found in the HF cache).

    The download honours HF_TOKEN (gated repos such as meta-llama), HF_HOME (where the cache lives)
    and HF_HUB_OFFLINE=1 (use the cache only). A local directory never touches the network.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or not REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise UserError(
            f"model {name!r} is neither a directory nor a Hugging Face repo id; "
            f"pass a directory holding config.json and *.safetensors, or an id such as meta-llama/Llama-3.1-8B-Instruct"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise UserError(
            f"the Hub repo {name} is gated; accept its licence on its Hub page and set HF_TOKEN to a "
            f"token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"the Hub repo {name} does not exist or needs a token; check the id, or set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{name} is not in the Hugging Face cache and the Hub cannot be reached (offline or HF_HUB_OFFLINE=1); "
            f"download it once with network access, or pass a local model directory"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise UserError(
            f"downloading {name} from the Hub failed ({error}); retry, or pass a local model directory"
        ) from None


def read_config(model_dir: Path) -> ModelArgs:
    """ModelArgs from config.json, in the classic form (rope_theta + rope_scaling) or the newer
    rope_parameters form that recent transformers versions write."""
    config_path = model_dir / CONFIG_FILE
    config = read_json_file(
        config_path,
        "a model directory needs the config.json of its checkpoint",
        "restore it from the original checkpoint",
    )
    if config.get("model_type") != "llama":
        raise UserError(
            f"{config_path} describes a {config.get('model_type')!r} model; qadapter-min runs Llama models "
            f"(model_type 'llama'), such as meta-llama/Llama-3.1-8B-Instruct"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UserError(f"{config_path} sets {flag}; Llama 3 has no biases and qadapter-min does not support them")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{config_path} uses hidden_act {config['hidden_act']!r}; Llama uses 'silu'")

    if "rope_parameters" in config:  # newer form: one dict holding rope_theta and the scaling keys
        rope = dict(config["rope_parameters"])
        rope_theta = rope.pop("rope_theta", 10000.0)
        rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    else:
        rope_theta = config.get("rope_theta", 10000.0)
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None

    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [key for key in required if key not in config]
    if missing:
        raise UserError(f"{config_path} lacks {', '.join(missing)}; it is not a complete Llama config.json")
    try:
        return ModelArgs(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            head_dim=config.get("head_dim"),
            vocab_size=config["vocab_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )
    except ValueError as error:
        raise UserError(f"{config_path}: {error}; qadapter-min runs Llama 3.x checkpoints") from None


def checkpoint_name_to_ours(name: str) -> str:
    """HF tensor name -> our parameter name: our modules mirror HF's, without the "model." prefix.

    model.embed_tokens.weight                  -> embed_tokens.weight
    model.layers.{i}.self_attn.q_proj.weight   -> layers.{i}.self_attn.q_proj.weight
    model.norm.weight                          -> norm.weight
    lm_head.weight                             -> lm_head.weight
    """
    return name.removeprefix("model.")


def ours_to_checkpoint_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def safetensors_files(model_dir: Path) -> dict[Path, list[str]]:
    """Which tensor names to read from which file: from the index of a sharded checkpoint, or all of
    the single model.safetensors."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(
                f"{index_path} is not a safetensors index with a weight_map; restore it from the checkpoint"
            ) from None
        files: dict[Path, list[str]] = {}
        for name, file_name in weight_map.items():
            shard = (model_dir / file_name).resolve()
            if shard.parent != model_dir.resolve():  # a shard name must not point outside the model directory
                raise UserError(f"{index_path} points {name} at {file_name!r}, outside the model directory")
            files.setdefault(shard, []).append(name)
        for shard in files:
            if not shard.is_file():
                raise UserError(f"{shard} is listed in {index_path} but does not exist; download the missing shard")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {single: list(f.keys())}
    raise UserError(
        f"{model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}; qadapter-min loads safetensors checkpoints only"
    )


def open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); download it again") from None


def load_model(
    path_or_repo_id: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    score_head: bool = False,
) -> Transformer:
    """A Transformer with the checkpoint's weights, in eval mode, every base weight frozen.

    score_head: the checkpoint is a reward model in the LlamaForSequenceClassification layout, whose head is
    `score.weight` (one row: the reward) in place of the LM head; the model's head is then that row, so its
    "logits" (B, T, 1) are the reward read at each position."""
    model_dir = resolve_model_dir(path_or_repo_id)
    model = empty_model(model_dir, score_head)
    state = {
        name: tensor.to(device=device, dtype=dtype) for name, tensor in checkpoint_tensors(model_dir, model, score_head)
    }
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def empty_model(model_dir: Path, score_head: bool = False) -> Transformer:
    """The checkpoint's model on the meta device: every shape, no memory, no values."""
    args = read_config(model_dir)
    if score_head:
        args = replace(args, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Transformer(args)
        if score_head:
            model.lm_head = torch.nn.Linear(args.hidden_size, 1, bias=False)
    return model


def checkpoint_tensors(
    model_dir: Path, model: Transformer, score_head: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, each (our name, the tensor as stored, on the CPU), checked
    against the model's shapes; refuses a checkpoint that lacks one of the model's tensors once all are read.
    A caller that keeps only part of each tensor (sharding.load_sharded_model) never holds two at once."""
    files = safetensors_files(model_dir)
    if score_head:
        check_score_head(model_dir, files)
    expected_shapes = {  # the base's: not what train.py adds (LoRA, a reward model's new score head)
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if ".lora_" not in name and not name.startswith("score.")
    }
    read = set()
    for path, names in files.items():
        with open_safetensors(path) as f:
            present = set(f.keys())
            for hf_name in names:
                name = (
                    "lm_head.weight" if score_head and hf_name == "score.weight" else checkpoint_name_to_ours(hf_name)
                )
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; we recompute it
                    continue
                if name == "lm_head.weight" and model.args.tie_word_embeddings:  # a tied head is the embedding
                    continue
                if name not in expected_shapes:
                    raise UserError(
                        f"{path} holds the tensor {hf_name}, which a Llama model of this config.json does not have; "
                        f"check that the directory holds one complete Llama checkpoint"
                    )
                if hf_name not in present:
                    raise UserError(
                        f"{path} lacks the tensor {hf_name} that {INDEX_FILE} places there; download the shard again"
                    )
                shape = tuple(f.get_slice(hf_name).get_shape())
                if shape != expected_shapes[name]:
                    raise UserError(
                        f"{path}: tensor {hf_name} has shape {shape} but config.json implies {expected_shapes[name]}; "
                        f"the weights and config.json come from different models"
                    )
                try:
                    tensor = f.get_tensor(hf_name)
                except (SafetensorError, OSError, RuntimeError) as error:
                    raise UserError(
                        f"{path}: tensor {hf_name} cannot be read ({error}); download the file again"
                    ) from None
                read.add(name)
                yield name, tensor
                del tensor  # the caller's copy of it is the only one left
    missing = sorted(set(expected_shapes) - read)
    if missing:
        raise UserError(
            f"{model_dir} lacks the tensor {ours_to_checkpoint_name(missing[0])}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; the checkpoint is incomplete or is not a Llama model of this config.json"
        )


def check_score_head(model_dir: Path, files: dict[Path, list[str]]):
    """Refuse a reward model whose head is not one row `score.weight` (one label: the reward)."""
    for path, names in files.items():
        if "score.weight" in names:
            with open_safetensors(path) as f:
                labels = f.get_slice("score.weight").get_shape()[0]
            if labels != 1:
                raise UserError(f"{path}: score.weight has {labels} labels; a reward model has one (its reward)")
            return
    raise UserError(
        f"{model_dir} has no score.weight; a reward model is a Llama in the LlamaForSequenceClassification "
        f"layout (the model.* tensors and score.weight)"
    )


def model_fingerprint(model) -> str:
    """A hash of the base model's config, tensor names and shapes, and final-norm weights (rounded to
    bf16, so the load dtype does not matter): an adapter only fits the model it was trained on, and
    two checkpoints of one shape (a base and an Instruct model) differ in their weights."""
    shapes = sorted((name, list(p.shape)) for name, p in model.named_parameters() if "lora_" not in name)
    # gathered, when sharded
    norm = full(model.norm.weight).detach().to(torch.bfloat16).float().cpu().tolist()
    blob = json.dumps({"args": asdict(model.args), "shapes": shapes, "norm": norm}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
