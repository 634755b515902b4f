"""Merge an adapter into its base model: a complete Hugging Face checkpoint, loaded as a plain model by
transformers, vLLM, llama.cpp's converter and every script here.

    python export.py --adapter out --out merged                  # onto the base model the run recorded
    python export.py --adapter out --model DIR --out merged      # the base, where it is now

Every adapted projection becomes W + (alpha/r) B A, in the base model's dtype; every other tensor is
copied as stored, one tensor at a time, in safetensors shards of at most --max_shard_size
(qadapter_min/merge.py). The base's config.json, generation_config.json and tokenizer files go beside
the weights. The checkpoint appears at --out only once it is whole.

What the export is: a DPO or SFT adapter's policy, exactly (its adapter-on model). A Q-Adapter adapter's
policy is pi~ = softmax((Q + alpha0 log pi1) / alpha), which needs the base model beside the adapter;
the export is softmax(Q) alone, pi~ only at alpha0 0 and alpha 1 (sample.py --adapter OUT serves pi~).
"""

import argparse
import os
import re
import shutil
import time
from pathlib import Path

import torch

from qadapter_min import UserError
from qadapter_min.adapters import ADAPTER_WEIGHTS
from qadapter_min.common import Parser, Progress, choose_dtype, default_device, run_command_line, write_json
from qadapter_min.data import check_data_file, collate, encode_pairs, load_pairs
from qadapter_min.lora import adapter_disabled
from qadapter_min.merge import write_merged_checkpoint
from qadapter_min.objective import Objective, policy_logits
from qadapter_min.policy import load_adapter, load_run_config, read_adapter_config, recorded_base_model
from qadapter_min.run_dir import write_model_card
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import (
    checkpoint_name_to_ours,
    empty_model,
    load_model,
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


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--adapter", required=True, help="an output directory of train.py")
    p.add_argument("--out", required=True, help="the directory to write the merged checkpoint to")
    p.add_argument("--model", help="the base model (None: the one the adapter's run recorded)")
    p.add_argument(
        "--max_shard_size",
        default="5GB",
        help="the largest safetensors file, as transformers writes it: 5GB, 500MB, or bytes",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--pairs",
        help="for a Q-Adapter adapter: preference pairs (any format train.py reads) on whose replies "
        "to measure how far the export is from pi~, into OUT/export.json",
    )
    p.add_argument("--domain", help="with --pairs of DSP: the preferred domain")
    p.add_argument(
        "--max_len", type=int, default=1024, help="with --pairs: longest sequence (truncated as train.py does)"
    )
    args = p.parse_args(argv)
    if args.pairs is None and (args.domain is not None or args.max_len != 1024):
        flag = "--domain" if args.domain is not None else "--max_len"
        raise UserError(f"{flag} sets how --pairs is read; pass --pairs FILE too, or drop {flag}")
    if args.pairs is not None:
        check_data_file(Path(args.pairs))
    args.max_shard_bytes = shard_bytes(args.max_shard_size)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} already exists; pass another --out, or --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    if not out.absolute().parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.absolute().parent} does not exist; create it")
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


@torch.no_grad()
def distance_to_the_policy(model_dir: Path, adapter: Path, objective, args) -> dict:
    """How far the export, softmax(Q), is from the policy pi~ the Q-Adapter defines: the mean over every
    reply token of both replies of each pair of KL(pi~(.|s_t) || softmax(Q(s_t, .)))."""
    tokenizer = Tokenizer(model_dir)
    quiet = lambda *_: None  # noqa: E731
    pairs = encode_pairs(load_pairs(args.pairs, args.domain, log=quiet), tokenizer, args.max_len, log=quiet)
    if not pairs:
        raise UserError(f"--pairs {args.pairs} holds no pair that fits --max_len {args.max_len}")
    device = default_device()
    model = load_model(model_dir, dtype=choose_dtype(None, device), device=device)
    load_adapter(model, adapter)
    model.eval()
    total, tokens = 0.0, 0
    progress = Progress("KL to pi~", len(pairs), "pairs")
    for pair in pairs:  # a pair at a time: two rows of vocabulary-wide logits
        ids, response_mask = (t.to(device) for t in collate([pair], tokenizer.pad_id))
        q = model(ids).float()[:, :-1]  # the logits at t-1 choose token t
        with adapter_disabled(model):
            base = model(ids).float()[:, :-1]
        log_pi = policy_logits(q, base, objective.alpha, objective.alpha0).log_softmax(-1)
        kl = (log_pi.exp() * (log_pi - q.log_softmax(-1))).sum(-1)  # (2, T - 1)
        scored = response_mask[:, 1:]
        total, tokens = total + kl[scored].sum().item(), tokens + int(scored.sum())
        progress.advance(1)
    return {
        "kl_customised_to_exported": total / tokens,
        "tokens": tokens,
        "pairs": len(pairs),
        "alpha": objective.alpha,
        "alpha0": objective.alpha0,
        "data": str(args.pairs),
    }


def main(argv=None):
    args = parse_args(argv)
    adapter, out = Path(args.adapter), Path(args.out)
    run, config, lora = read_adapter(adapter)
    objective = Objective.read(run)
    if args.pairs is not None and objective.policy_mode != "customised":
        raise UserError(
            f"--pairs measures how far a Q-Adapter's export is from its policy pi~; {adapter} is a "
            f"{objective.name} adapter, whose export is its policy exactly: drop --pairs"
        )
    model_dir = resolve_model_dir(args.model or recorded_base_model(adapter, run["base_model"]))
    check_base(model_dir, run, adapter)
    scale = config["lora_alpha"] / config["r"]
    started, partial = time.time(), out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    partial.mkdir()
    names = write_merged_checkpoint(model_dir, partial, lora, scale, args.max_shard_bytes, what="export")
    for file in BESIDE_THE_WEIGHTS:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, partial / file)
    if args.pairs is not None:
        distance = distance_to_the_policy(model_dir, adapter, objective, args)
        write_json(partial / "export.json", distance)
    write_model_card(partial, adapter)
    if out.exists():  # --overwrite: the old export goes only now that the new one is whole
        shutil.rmtree(out)
    os.replace(partial, out)
    print(
        f"{len(lora)} projections merged into {model_dir}'s weights: {out}/ "
        f"({len(names)} file{'s' if len(names) > 1 else ''}, {time.time() - started:.0f}s)"
    )
    if args.pairs is not None:
        print(
            f"KL(pi~ || the export) per reply token: {distance['kl_customised_to_exported']:.4g} over "
            f"{distance['tokens']} tokens of {distance['pairs']} pairs ({out / 'export.json'})"
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
