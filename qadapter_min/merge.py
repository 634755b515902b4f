"""A complete checkpoint with an adapter merged into its base model's weights, written one tensor at
a time: export.py's output, and the reward model train.py --objective rm writes.

Every adapted projection becomes W + scale B A, in the base model's dtype; every other tensor is copied
as stored. The tensors go in safetensors shards of at most max_bytes, with model.safetensors.index.json
when there are several, as transformers' save_pretrained writes them. One tensor of the base is held at
a time: each shard's header is planned from the base's headers, then every tensor is read, merged and
appended.
"""

import json
import struct
from pathlib import Path

import torch

from qadapter_min import UserError
from qadapter_min.common import Progress
from qadapter_min.weights import INDEX_FILE, SINGLE_FILE, checkpoint_name_to_ours, open_safetensors, safetensors_files

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BYTES = {"F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def plan_shards(files: dict, max_bytes: int, leave_out=()) -> list[list[tuple[str, str, list, Path]]]:
    """The tensors of the merged checkpoint, (name, dtype, shape, source file), in shards of at most
    max_bytes (a tensor larger than that alone in its own), in the base's order; leave_out: names
    of the base's tensors that the checkpoint does not hold."""
    shards, size = [[]], 0
    for path, names in files.items():
        with open_safetensors(path) as f:
            for name in names:
                if name.endswith("rotary_emb.inv_freq") or name in leave_out:  # an old buffer
                    continue
                view = f.get_slice(name)
                dtype, shape = view.get_dtype(), view.get_shape()
                if dtype not in DTYPES:
                    raise UserError(f"{path}: tensor {name} is {dtype}; qadapter-min merges F32, F16, BF16")
                nbytes = BYTES[dtype] * int(torch.Size(shape).numel())
                if shards[-1] and size + nbytes > max_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append((name, dtype, shape, path))
                size += nbytes
    return shards


def merged(name: str, tensor: torch.Tensor, lora: dict, scale: float) -> torch.Tensor:
    """W + scale B A for an adapted projection, in W's dtype; any other tensor as it is."""
    module = checkpoint_name_to_ours(name).removesuffix(".weight")
    if module not in lora:
        return tensor
    A, B = lora[module]
    return (tensor.float() + scale * (B @ A)).to(tensor.dtype)


def write_shard(path: Path, tensors: list, lora: dict, scale: float, progress: Progress):
    """A safetensors file written a tensor at a time: the header (each tensor's dtype, shape and byte
    range) first, from the plan, then each tensor's bytes as it is read and merged. A tensor whose
    source is itself a tensor (not a file) is written as it is."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in tensors:
        nbytes = BYTES[dtype] * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, _, _, source in tensors:
            if isinstance(source, torch.Tensor):
                tensor = source
            else:
                with open_safetensors(source) as f:
                    tensor = merged(name, f.get_tensor(name), lora, scale)
            out.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            del tensor  # the one tensor held
            progress.advance(1)


def write_merged_checkpoint(
    model_dir: Path, out: Path, lora: dict, scale: float, max_bytes: int, added=None, leave_out=(), what: str = "merge"
) -> list[str]:
    """The base model's tensors in model_dir, with lora ({our module name: (A, B)}, fp32) merged at
    scale, written to the directory out; added: {name: tensor} written after the base's, leave_out:
    names of the base's tensors left out; what: the progress line's name. Returns the names of the
    files written."""
    shards = plan_shards(safetensors_files(model_dir), max_bytes, leave_out)
    for name, tensor in (added or {}).items():
        shards[-1].append((name, DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor))
    progress = Progress(what, sum(len(s) for s in shards), "tensors")
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for name, tensors in zip(names, shards):
        write_shard(out / name, tensors, lora, scale, progress)
    if count > 1:
        total = sum(BYTES[d] * int(torch.Size(s).numel()) for shard in shards for _, d, s, _ in shard)
        weight_map = {t[0]: name for name, tensors in zip(names, shards) for t in tensors}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
