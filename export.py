"""Merge an adapter into its base model: a complete Hugging Face checkpoint, loaded as a plain model by
transformers, vLLM, llama.cpp's converter and every script here.

    python export.py --adapter out --out merged                  # onto the base model the run recorded
    python export.py --adapter out --model DIR --out merged      # the base, where it is now

Every adapted projection becomes W + (alpha/r) B A, in the base model's dtype; every other tensor is
copied as stored. The base's config.json, generation_config.json and tokenizer files go beside the
weights, in safetensors shards of at most --max_shard_size (with model.safetensors.index.json when there
are several, as transformers' save_pretrained writes them). One tensor of the base is held at a time:
each shard's header is planned from the base's headers, then every tensor is read, merged and appended.
The checkpoint appears at --out only once it is whole.

What the export is: a DPO or SFT adapter's policy, exactly (its adapter-on model). A Q-Adapter adapter's
policy is pi~ = softmax((Q + alpha0 log pi1) / alpha), which needs the base model beside the adapter;
the export is softmax(Q) alone, pi~ only at alpha0 0 and alpha 1 (sample.py --adapter OUT serves pi~).
"""

import argparse
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import torch

from qadapter_min import UserError
from qadapter_min.adapters import ADAPTER_WEIGHTS, load_run_config, read_adapter_config
from qadapter_min.common import HelpFormatter, Progress, run_command_line
from qadapter_min.objective import Objective
from qadapter_min.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    checkpoint_name_to_ours,
    empty_model,
    model_fingerprint,
    open_safetensors,
    resolve_model_dir,
    safetensors_files,
)

BESIDE_THE_WEIGHTS = [  # copied from the base, where it has them
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--adapter", required=True, help="an output directory of train.py")
    p.add_argument("--out", required=True, help="the directory to write the merged checkpoint to")
    p.add_argument(
        "--model", default=None, help="the base model (None: the one the adapter's run recorded)"
    )
    p.add_argument(
        "--max_shard_size",
        default="5GB",
        help="the largest safetensors file, as transformers writes it: 5GB, 500MB, or bytes",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    args.max_shard_bytes = shard_bytes(args.max_shard_size)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(
            f"--out {out} already exists; pass another --out, or --overwrite to replace it"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    if not out.absolute().parent.is_dir():
        raise UserError(
            f"--out {out}: the directory {out.absolute().parent} does not exist; create it"
        )
    return args


def shard_bytes(size: str) -> int:
    """5GB -> 5 * 10^9 bytes, 500MB, 2GiB -> 2 * 2^30, or a plain number of bytes."""
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)?\s*", size.upper())
    if not match or float(match[1]) <= 0:
        raise UserError(f"--max_shard_size {size} is not a size; pass one such as 5GB or 500MB")
    return int(float(match[1]) * units[match[2] or ""])


def read_adapter(adapter: Path) -> tuple[dict, dict, dict]:
    """(qadapter_config.json, adapter_config.json, {our module name: (A, B)} in fp32), or a refusal."""
    run, config = load_run_config(adapter), read_adapter_config(adapter)
    pairs = {}
    with open_safetensors(adapter / ADAPTER_WEIGHTS) as f:
        for name in f.keys():
            module, _, part = name.removeprefix("base_model.model.").rpartition(".lora_")
            pairs.setdefault(checkpoint_name_to_ours(module), {})[part] = f.get_tensor(name).float()
    lora = {module: (parts["A.weight"], parts["B.weight"]) for module, parts in pairs.items()}
    return run, config, lora


def check_base(model_dir: Path, run: dict, adapter: Path):
    """Refuse a base model other than the adapter's: the fingerprint needs the shapes and the final norm
    alone, so only that one tensor is read."""
    model = empty_model(model_dir)
    files = safetensors_files(model_dir)
    for path, names in files.items():
        if "model.norm.weight" in names:
            with open_safetensors(path) as f:
                model.norm.weight = torch.nn.Parameter(f.get_tensor("model.norm.weight"))
    if model_fingerprint(model) != run["base_model_fingerprint"]:
        raise UserError(
            f"{adapter} was trained on another base model than {model_dir} (its config, tensor shapes or "
            f"weights differ); pass the adapter's own base model with --model"
        )


def plan_shards(files: dict, max_bytes: int) -> list[list[tuple[str, str, list, Path]]]:
    """The tensors of the export, (name, dtype, shape, source file), in shards of at most max_bytes
    (a tensor larger than that alone in its own), in the base's order."""
    shards, size = [[]], 0
    for path, names in files.items():
        with open_safetensors(path) as f:
            for name in names:
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints kept
                    continue
                view = f.get_slice(name)
                dtype, shape = view.get_dtype(), view.get_shape()
                if dtype not in DTYPES:
                    raise UserError(
                        f"{path}: tensor {name} is {dtype}; export.py merges F32, F16, BF16"
                    )
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
    range) first, from the plan, then each tensor's bytes as it is read and merged."""
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
            with open_safetensors(source) as f:
                tensor = merged(name, f.get_tensor(name), lora, scale)
            out.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            del tensor  # the one tensor held
            progress.advance(1)


def main(argv=None):
    args = parse_args(argv)
    adapter, out = Path(args.adapter), Path(args.out)
    run, config, lora = read_adapter(adapter)
    objective = Objective.read(run)
    model_dir = resolve_model_dir(args.model or run["base_model"])
    check_base(model_dir, run, adapter)
    scale = config["lora_alpha"] / config["r"]
    files = safetensors_files(model_dir)
    shards = plan_shards(files, args.max_shard_bytes)
    started, partial = time.time(), out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    partial.mkdir()
    progress = Progress("export", sum(len(s) for s in shards), "tensors")
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, tensors in zip(names, shards):
        write_shard(partial / name, tensors, lora, scale, progress)
    if len(shards) > 1:
        total = sum(
            BYTES[d] * int(torch.Size(s).numel()) for shard in shards for _, d, s, _ in shard
        )
        weight_map = {t[0]: name for name, tensors in zip(names, shards) for t in tensors}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for file in BESIDE_THE_WEIGHTS:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, partial / file)
    if out.exists():  # --overwrite: the old export goes only now that the new one is whole
        shutil.rmtree(out)
    os.replace(partial, out)
    print(
        f"{len(lora)} projections merged into {model_dir}'s weights: {out}/ "
        f"({len(names)} file{'s' if len(names) > 1 else ''}, {time.time() - started:.0f}s)"
    )
    if objective.policy_mode == "customised":
        print(
            f"a Q-Adapter adapter: the export is softmax(Q), not the customised policy pi~ "
            f"(alpha {objective.alpha:g}, alpha0 {objective.alpha0:g}), which is that only at alpha 1 "
            f"and alpha0 0; sample.py --adapter {adapter} serves pi~"
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_command_line(main)
