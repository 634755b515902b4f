"""The GPU check: one prepared command for a bare machine with one GPU, reporting what a user asks first.

    tools/gpu_check.sh OUT_DIR         # on a GPU: bf16 parity, the 8B step in 24 GiB, MFU, decoding
    tools/gpu_check.sh --cpu OUT_DIR   # the same parts on the CPU at a tiny shape
    tools/gpu_check.sh --cpu --compile_backend aot_eager OUT_DIR   # the suite's run: see part 4
    tools/gpu_check.sh --minutes 6 OUT_DIR   # stop at 6 minutes instead of 8, keeping what finished

Its parts run in this order, and each adds its numbers to OUT_DIR/summary.json and OUT_DIR/summary.md as
soon as it has them (parts 3 and 4 row by row), so a run cut short still reports what it finished:

1. parity    the test fixtures' logits on the device against fp32 on the CPU (max and mean absolute
             difference, top-1 agreement), the objective's loss and LoRA gradients, and greedy decoding of
             the customised policy. On a GPU the device runs fp32 (the code, compared) and bf16 (what a run
             uses); with --cpu, bf16 on the CPU against fp32.
2. step      one training step (train.py's, step.py) at the llama-3.1-8b shape, random bf16 weights,
             pairs of 512 tokens (256 of them the reply): micro-batch 1 with gradient checkpointing in a
             24 GiB memory cap (a 4090's memory), then micro-batch 4 without the cap, with and without
             checkpointing. Time, tokens/s, MFU and peak memory against the memory plan.
3. decoding  greedy tokens/s at batch 1, 8 and 32, base model and customised policy, against the limit
             memory bandwidth sets (each decoding step reads every weight once), and batching's gain
             over one prompt at a time.
4. compiled  the same with --compile's decoding step at batch 1 and 32 (each first call compiles, and
             is timed), and the training step of 4 pairs without checkpointing compiled (train.py
             --compile) beside its eager time from part 2. Last: compiling takes the longest. With
             --compile_backend aot_eager the graphs are captured as --compile captures them but run
             with PyTorch's kernels: the part's code is checked in seconds, its times are not
             --compile's (inductor's code generation takes 2.5 minutes for this part at --cpu's
             shape on 2 cores).

MFU counts 6N FLOPs per token, N the base model's parameters without the embedding (a lookup, not a
product; bench.matmul_parameters): the usual convention, and here also the real count of a step
without checkpointing (2N for
the adapter pass, 2N for its backward, which needs no weight gradients for the frozen weights, and 2N
for the base pass). With checkpointing each block runs forward once more: 8N, the hardware FLOPs (HFU).
Both overcount slightly: the objective applies the LM head at the reply positions alone.

Sized for 8 minutes on one H200 from a fresh checkout: building the 8B model takes seconds, a step of 4
pairs about a second, 64 decoding steps under a second at batch 1 to a few at batch 32; parts 1-3
about two minutes in all, most of it start-up and warm-up. Part 4 compiles four decoding steps on the
machine's CPUs, about a minute each for an 8B model (its 32 blocks give the same kernels, generated
once), and the training step's three traces of a single block (compiled.compile_for_training), so
the check ends within 8 minutes. --minutes (8) makes sure of it, as no GPU has timed part 4 yet: at
the deadline an alarm stops the part running, which keeps the rows it finished, and the parts after
it are left out, each marked so in the summaries.
"""

import argparse
import json
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    CARDS,
    PRESETS,
    build,
    bytes_read_per_step,
    llama3_shape,
    matmul_parameters,
    our_step,
    pair_batch,
    time_step,
)
from qadapter_min import compiled as compiled_steps  # noqa: E402
from qadapter_min.generate import generate, generate_batch  # noqa: E402
from qadapter_min.lora import add_lora, lora_layers  # noqa: E402
from qadapter_min.memory import training_memory_gib  # noqa: E402
from qadapter_min.model import ModelArgs  # noqa: E402
from qadapter_min.step import micro_batch_objective  # noqa: E402
from qadapter_min.weights import load_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
PARITY_MODELS = ("tiny-llama-tied", "tiny-llama-untied-sharded", "lm-eval-llama/model")
CPU_SHAPE = llama3_shape(128, 384, 4, 4, kv_heads=2, vocab=4096)
STEP_4 = {"micro_batch_pairs": 4, "gradient_checkpointing": False}  # the step the compiled one is set beside
CAP_GIB = 23.5  # an RTX 4090's 24 GiB less about 0.5 GiB that CUDA's context takes outside PyTorch's allocator


class Summary:
    """The numbers so far, rewritten to summary.json and summary.md after every part."""

    def __init__(self, out: Path, facts: dict):
        self.out, self.data = out, {**facts, "parts": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, part: str, numbers):
        self.data["parts"][part] = numbers
        self.write()

    def write(self):
        (self.out / "summary.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "summary.md").write_text(markdown(self.data))


class OutOfTime(Exception):
    """The --minutes budget ran out in the middle of a part."""


class Budget:
    """--minutes: an alarm at the deadline raises OutOfTime in the part running (outside a part it only
    marks the budget spent), and every part after it is left out."""

    def __init__(self, minutes: float):
        self.why = f"stopped at the {minutes:g}-minute budget (--minutes)"
        self.spent, self.in_part = False, False
        signal.signal(signal.SIGALRM, self.ring)
        signal.setitimer(signal.ITIMER_REAL, minutes * 60)

    def ring(self, *_):
        self.spent = True
        if self.in_part:
            raise OutOfTime(self.why)

    def stop(self):
        signal.setitimer(signal.ITIMER_REAL, 0)


def gpu() -> bool:
    return torch.cuda.is_available()


def synchronize():
    if gpu():
        torch.cuda.synchronize()


def seconds_of(work, repeats: int) -> float:
    """Median seconds of work() after one warm-up (repeats 0: the one call's, no warm-up)."""
    times = []
    for _ in range(repeats + 1):
        synchronize()
        started = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:] or times)


# ------------------------------------------------------------------------------------------------
# 1. Parity


def parity(device: str) -> dict:
    forms = [("fp32", torch.float32), ("bf16", torch.bfloat16)] if device == "cuda" else [("bf16", torch.bfloat16)]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on the GPU means fp32
    tokens = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    numbers = {"logits": {}, "objective": {}, "greedy": {}}
    for fixture in PARITY_MODELS:
        reference = load_model(FIXTURES / fixture)(tokens)
        for form, dtype in forms:
            logits = load_model(FIXTURES / fixture, dtype=dtype, device=device)(tokens.to(device)).float().cpu()
            numbers["logits"][f"{fixture} {form}"] = {
                "max_abs_diff": (logits - reference).abs().max().item(),
                "mean_abs_diff": (logits - reference).abs().mean().item(),
                "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            }
    response_mask = torch.zeros_like(tokens, dtype=torch.bool)
    response_mask[:, 24:] = True
    reference_loss, reference_grads = objective_and_grads(torch.float32, "cpu", tokens, response_mask)
    prompts = [torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 13, 17)]
    reference_replies = greedy_replies(adapted_model(torch.float32, "cpu"), prompts)
    for form, dtype in forms:
        loss, grads = objective_and_grads(dtype, device, tokens, response_mask)
        numbers["objective"][form] = {
            "loss_relative_diff": abs(loss - reference_loss) / abs(reference_loss),
            "grad_max_relative_diff": max(
                (g - r).abs().max().item() / r.abs().max().item() for g, r in zip(grads, reference_grads)
            ),
        }
        replies = greedy_replies(adapted_model(dtype, device), prompts)
        agree = [
            next((i for i, (a, b) in enumerate(zip(r, ref)) if a != b), len(ref))
            for r, ref in zip(replies, reference_replies)
        ]
        numbers["greedy"][form] = {
            "identical_replies": f"{sum(a == 32 for a in agree)}/{len(prompts)}",
            "tokens_before_first_difference": agree,
        }
    return numbers


def adapted_model(dtype, device):
    """The lm-eval fixture's model with LoRA whose B is drawn at random, not zero: Q differs from pi1."""
    torch.manual_seed(0)
    model = add_lora(
        load_model(FIXTURES / "lm-eval-llama/model", dtype=dtype, device=device), r=4, alpha=8, dropout=0.0
    )
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(
                torch.randn(layer.lora_B.weight.shape, generator=torch.Generator().manual_seed(layer.index))
            )
    return model


def objective_and_grads(dtype, device, tokens, response_mask):
    model = adapted_model(dtype, device)
    loss, _ = micro_batch_objective(model, tokens.to(device), response_mask.to(device))
    loss.backward()
    return loss.item(), [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]


def greedy_replies(model, prompts):
    return [list(generate(model, p, stop_ids=[], max_new_tokens=32, policy_mode="customised")) for p in prompts]


# ------------------------------------------------------------------------------------------------
# 2. The training step


def training_steps(args: ModelArgs, device: str, peak_tflops, repeats: int, configurations, length: int = 512):
    """(the model, N, a row of numbers per configuration (pairs, checkpointing, memory cap in GiB or None)),
    each pair's replies `length` tokens with the prompt."""
    model = build(args, device, torch.bfloat16)
    model.train()
    if gpu():
        torch.cuda.empty_cache()  # build's fp32 staging copy, so the cap below counts the model alone
    parameters = matmul_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for pairs, checkpointing, cap_gib in configurations:
        model.gradient_checkpointing = checkpointing
        tokens, response_mask = pair_batch(args.vocab_size, length, length // 2, device=device, pairs=pairs)
        row = {
            "micro_batch_pairs": pairs,
            "gradient_checkpointing": checkpointing,
            "memory_cap_gib": cap_gib,
            "tokens_per_step": tokens.numel(),
        }
        if gpu():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 1024**3 / total) if cap_gib else 1.0)
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds, loss, _ = time_step(our_step, model, tokens, response_mask, repeats, synchronize)
        except torch.OutOfMemoryError:
            row["error"] = f"out of memory under the {cap_gib} GiB cap" if cap_gib else "out of memory"
            rows.append(row)
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        tokens_per_s = tokens.numel() / seconds
        plan = training_memory_gib(args, trainable, pairs, tokens.shape[1], weight_bytes=2, checkpointing=checkpointing)
        row.update(
            step_ms=seconds * 1000,
            tokens_per_s=tokens_per_s,
            loss=loss,
            plan_gib=sum(plan.values()),
            plan_parts_gib=plan,
        )
        row["mfu"] = 6 * parameters * tokens_per_s / (peak_tflops * 1e12)
        row["hfu"] = (8 if checkpointing else 6) * parameters * tokens_per_s / (peak_tflops * 1e12)
        if gpu():
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
            row["measured_over_plan"] = row["peak_memory_gib"] / row["plan_gib"]
        rows.append(row)
        model.zero_grad(set_to_none=True)
    if gpu():
        torch.cuda.set_per_process_memory_fraction(1.0)
    return model, parameters, rows


# ------------------------------------------------------------------------------------------------
# 3. Decoding


def decoding(model, bandwidth, new_tokens: int, keep, batch_sizes=(1, 8, 32), compiled=False) -> dict:
    """Greedy tokens/s (all rows together) for prompts of 32 tokens, eager or compiled (--compile); the
    limit at bandwidth (GB/s, where the number comes from): every weight read once per step
    (bench.bytes_read_per_step); batching's gain over one prompt at a time; each row's first call,
    which for a compiled one compiles. keep(numbers) after each row."""
    model.eval()
    weight_bytes = bytes_read_per_step(model)
    steps_per_s_limit = bandwidth[0] * 1e9 / weight_bytes
    generator = torch.Generator().manual_seed(0)
    numbers = {
        "weight_gb": weight_bytes / 1e9,
        "new_tokens": new_tokens,
        "bandwidth_gbs": bandwidth[0],
        "bandwidth_source": bandwidth[1],
        "rows": [],
    }
    for policy_mode in ("base", "customised"):
        for batch_size in batch_sizes:
            prompts = [
                torch.randint(3, model.args.vocab_size, (32,), generator=generator).tolist() for _ in range(batch_size)
            ]

            def work():
                generate_batch(
                    model, prompts, stop_ids=[], max_new_tokens=new_tokens, policy_mode=policy_mode, compiled=compiled
                )

            first, again = (seconds_of(work, repeats=0) for _ in range(2))  # compiling, then not
            tokens_per_s = batch_size * new_tokens / again
            limit = batch_size * steps_per_s_limit
            alone = next(
                (r for r in numbers["rows"] if (r["policy"], r["batch"]) == (policy_mode, 1)),
                {"tokens_per_s": tokens_per_s},
            )
            numbers["rows"].append(
                {
                    "policy": policy_mode,
                    "compiled": compiled,
                    "batch": batch_size,
                    "tokens_per_s": tokens_per_s,
                    "bandwidth_limit_tokens_per_s": limit,
                    "of_limit": tokens_per_s / limit,
                    "gain_over_one_prompt": tokens_per_s / alone["tokens_per_s"],
                    "first_call_s": first,
                }
            )
            keep(numbers)
    return numbers


def copy_bandwidth_gbs(device: str) -> float:
    """Measured memory bandwidth: bytes read and written by a large device-to-device copy, per second."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB or 128 MiB of fp32
    source, target = torch.empty(n, device=device).fill_(1.0), torch.empty(n, device=device)
    return 2 * 4 * n / seconds_of(lambda: target.copy_(source), repeats=5) / 1e9


def matmul_tflops(device: str) -> float:
    """Measured bf16 matrix-product speed: what MFU's peak can be compared with."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / seconds_of(lambda: a @ a, repeats=5) / 1e12


# ------------------------------------------------------------------------------------------------
# The summary


def markdown(data: dict) -> str:
    stated = (
        f"stated peak {data['stated_peak_tflops']} TFLOP/s bf16 and {data['stated_bandwidth_gbs']} GB/s"
        if data["stated_peak_tflops"]
        else "no stated peak (not a card bench.py lists): the measured numbers stand in"
    )
    lines = [
        f"# GPU check: {data['device']}",
        "",
        f"{data['date']}; torch {data['torch']}, CUDA {data['cuda']}, Python {data['python']}; {stated}",
        "",
    ]
    parts = {  # a part that stopped keeps the rows it finished
        name: numbers
        for name, numbers in data["parts"].items()
        if "rows" in numbers or not {"error", "left_out"} & numbers.keys()
    }
    for name, numbers in data["parts"].items():
        if "error" in numbers:
            stopped = "stopped" if numbers["error"].startswith(OutOfTime.__name__) else "failed"
            lines += [f"**{name} {stopped}** after {numbers['seconds']:.0f} s: {numbers['error']}", ""]
        if "left_out" in numbers:
            lines += [f"**{name} left out**: {numbers['left_out']}", ""]
    if "device" in parts:
        d = parts["device"]
        lines += [
            f"Measured: bf16 matrix product {d['matmul_tflops']:.1f} TFLOP/s; "
            f"copy bandwidth {d['copy_bandwidth_gbs']:.0f} GB/s "
            f"({d['seconds']:.0f} s)",
            "",
        ]
    if "parity" in parts:
        p = parts["parity"]
        lines += [
            "## 1. Parity against fp32 on the CPU",
            "",
            "| logits of | max abs diff | mean abs diff | top-1 agreement |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['max_abs_diff']:.2e} | {v['mean_abs_diff']:.2e} | {v['top1_agreement']:.1%} |"
            for k, v in p["logits"].items()
        ]
        lines += [
            "",
            "| form | loss relative diff | LoRA grad max relative diff | greedy replies identical "
            "(32 tokens) | tokens before the first difference |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {form} | {v['loss_relative_diff']:.2e} | {v['grad_max_relative_diff']:.2e} | "
            f"{p['greedy'][form]['identical_replies']} | {p['greedy'][form]['tokens_before_first_difference']} |"
            for form, v in p["objective"].items()
        ]
        lines += ["", f"({p['seconds']:.0f} s)", ""]
    if "step" in parts:
        s = parts["step"]
        lines += [
            f"## 2. Training step: {s['shape']}, N = {s['parameters'] / 1e6:,.1f}M parameters without the embedding, "
            f"bf16; MFU and HFU against the {s['peak_source']} {s['peak_tflops']:.1f} TFLOP/s",
            "",
            "| pairs x 512 | checkpointing | cap | step | tokens/s | MFU (6N) | HFU | peak memory "
            "| plan | peak / plan |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            if "error" in r:
                lines.append(
                    f"| {r['micro_batch_pairs']} | {r['gradient_checkpointing']} | "
                    f"{r['memory_cap_gib']} | {r['error']} |"
                )
                continue
            lines.append(
                f"| {r['micro_batch_pairs']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                f"{str(r['memory_cap_gib']) + ' GiB' if r['memory_cap_gib'] else 'none'} | {r['step_ms']:.0f} ms | "
                f"{r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['hfu']:.1%} | "
                f"{fmt_gib(r.get('peak_memory_gib'))} | {r['plan_gib']:.2f} GiB | "
                f"{fmt_ratio(r.get('measured_over_plan'))} |"
            )
        lines += ["", f"({s['seconds']:.0f} s)", ""]
    if "decoding" in parts:
        d = parts["decoding"]
        lines += [
            f"## 3. Decoding: {d['new_tokens']} greedy tokens after 32-token prompts, "
            f"{d['weight_gb']:.2f} GB of weights, "
            f"limit at {d['bandwidth_gbs']:.0f} GB/s ({d['bandwidth_source']})",
            "",
            "| policy | decoding step | batch | tokens/s | bandwidth limit | of the limit "
            "| gain over batch 1 | first call |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['policy']} | {'compiled' if r['compiled'] else 'eager'} | {r['batch']} | "
            f"{r['tokens_per_s']:.1f} | {r['bandwidth_limit_tokens_per_s']:.1f} | {r['of_limit']:.0%} | "
            f"{r['gain_over_one_prompt']:.1f}x | {r['first_call_s']:.1f} s |"
            for r in d["rows"]
        ]
        lines += ["", f"({d['seconds']:.0f} s)", ""]
    if "compiled" in parts:
        c = parts["compiled"]
        lines += [
            "## 4. Compiled (--compile): decoding, and the step of 4 pairs without checkpointing",
            "",
            f"torch.compile backend: {c['backend']}",
            "",
            "| policy | batch | tokens/s | of the limit | gain over batch 1 | first call (compiling) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['policy']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['of_limit']:.0%} | "
            f"{r['gain_over_one_prompt']:.1f}x | {r['first_call_s']:.1f} s |"
            for r in c.get("rows", [])  # none yet while the first compiles
        ]
        lines.append("")
        if "step" in c:
            s = c["step"]
            eager = f", eager {s['eager_step_ms']:.0f} ms" if s["eager_step_ms"] else ""
            lines += [
                f"Training step compiled: {s['step_ms']:.0f} ms{eager}; its first call, compiling, "
                f"{s['first_call_s']:.0f} s",
                "",
            ]
        lines += [f"({c['seconds']:.0f} s)", ""]
    return "\n".join(lines) + "\n"


def fmt_gib(x):
    return "n/a" if x is None else f"{x:.2f} GiB"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory for summary.json and summary.md")
    p.add_argument("--cpu", action="store_true", help="run every part on the CPU at a tiny shape")
    p.add_argument(
        "--no_compiled", action="store_true", help="leave out part 4 (compiled), which takes the longest to start"
    )
    p.add_argument(
        "--compile_backend",
        choices=("inductor", "aot_eager"),
        default="inductor",
        help="part 4's torch.compile backend: inductor (--compile's) or aot_eager, the same graphs "
        "run with PyTorch's kernels, which checks the part in seconds (the suite's --cpu run)",
    )
    p.add_argument(
        "--minutes", type=float, default=8.0, help="stop at this many minutes, keeping what finished (default 8)"
    )
    args = p.parse_args()
    if args.no_compiled and args.compile_backend != "inductor":
        p.error("--compile_backend chooses part 4's backend and --no_compiled leaves part 4 out: pass one")
    if args.minutes <= 0:
        p.error(f"--minutes {args.minutes:g}: the budget must be more than 0 minutes")
    compiled_steps.BACKEND = args.compile_backend
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not gpu():
        p.error("no GPU is visible; run on a machine with one, or add --cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    stated_peak, stated_bandwidth = (
        next((v for k, v in CARDS.items() if k in name), (None, None)) if device == "cuda" else (None, None)
    )
    summary = Summary(
        args.out,
        {
            "device": name,
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "stated_peak_tflops": stated_peak,
            "stated_bandwidth_gbs": stated_bandwidth,
        },
    )

    budget = Budget(args.minutes)

    def part(name, work):
        """Run work(keep) and write its numbers, and through keep(numbers) those it has so far; a part
        that fails is reported with what it kept and the next still runs, unless the budget is spent."""
        if budget.spent:
            summary.add(name, {"left_out": f"the {args.minutes:g}-minute budget was spent"})
            return
        started = time.perf_counter()
        print(f"{name} ...", flush=True)
        kept = {}

        def keep(numbers):
            kept.update(numbers, seconds=time.perf_counter() - started)
            summary.add(name, kept)

        budget.in_part = True
        try:
            numbers = work(keep)
        except Exception as error:  # noqa: BLE001 (a scarce GPU run reports what it can)
            if budget.spent:  # the alarm's OutOfTime, perhaps wrapped by torch.compile in its own
                what = f"{OutOfTime.__name__}: {budget.why}"
            else:
                traceback.print_exc()
                what = f"{type(error).__name__}: {error}"
            numbers = {**kept, "error": what}
        budget.in_part = False
        numbers["seconds"] = time.perf_counter() - started
        summary.add(name, numbers)

    part(
        "device",
        lambda keep: {"matmul_tflops": matmul_tflops(device), "copy_bandwidth_gbs": copy_bandwidth_gbs(device)},
    )
    part("parity", lambda keep: parity(device))
    shape, decode_tokens = (CPU_SHAPE, 8) if args.cpu else (PRESETS["llama-3.1-8b"], 64)
    configurations = [(1, True, None if args.cpu else CAP_GIB), (4, True, None), (4, False, None)]
    held = {}

    measured = summary.data["parts"]["device"]
    peak, peak_source = (
        (stated_peak, "stated peak") if stated_peak else (measured.get("matmul_tflops"), "measured bf16 product's")
    )

    def step(keep):
        held["model"], parameters, rows = training_steps(
            shape, device, peak, 1 if args.cpu else 3, configurations, 128 if args.cpu else 512
        )
        return {
            "shape": "tiny (CPU)" if args.cpu else "llama-3.1-8b",
            "parameters": parameters,
            "rows": rows,
            "peak_tflops": peak,
            "peak_source": peak_source,
        }

    part("step", step)
    bandwidth = (
        (stated_bandwidth, "stated") if stated_bandwidth else (measured.get("copy_bandwidth_gbs"), "measured by a copy")
    )

    def decode(keep):
        model = held.get("model") or build(shape, device, torch.bfloat16)  # built here if the step part failed
        return decoding(model, bandwidth, decode_tokens, keep)

    part("decoding", decode)

    def compiled(keep):
        """Decoding at batch 1 and 32 and the step of 4 pairs without checkpointing, compiled: last, as
        compiling takes the longest; the model stays compiled afterwards."""
        model = held.get("model") or build(shape, device, torch.bfloat16)
        keep({"backend": args.compile_backend})
        numbers = decoding(model, bandwidth, decode_tokens, keep, (1, 32), compiled=True)
        eager = next((r for r in summary.data["parts"]["step"].get("rows", []) if r == {**r, **STEP_4}), None)
        compiled_steps.compile_for_training(model.train())
        tokens, response_mask = pair_batch(
            shape.vocab_size, *(128, 64) if args.cpu else (512, 256), device=device, pairs=4
        )
        model.gradient_checkpointing = False
        started = time.perf_counter()
        our_step(model, tokens, response_mask)
        synchronize()
        first = time.perf_counter() - started
        seconds, loss, _ = time_step(our_step, model, tokens, response_mask, 1 if args.cpu else 3, synchronize)
        numbers["step"] = {
            "step_ms": seconds * 1000,
            "first_call_s": first,
            "loss": loss,
            "eager_step_ms": eager and eager.get("step_ms"),
        }
        return {**numbers, "backend": args.compile_backend}

    if not args.no_compiled:
        part("compiled", compiled)
    budget.stop()
    print((args.out / "summary.md").read_text())
    errors = {name: n["error"] for name, n in summary.data["parts"].items() if "error" in n}
    cut = [name for name, error in errors.items() if error.startswith(OutOfTime.__name__)]
    failed = [name for name in errors if name not in cut]
    left_out = [name for name, n in summary.data["parts"].items() if "left_out" in n]
    said = [f"failed: {', '.join(failed)} (the summaries hold the errors)"] if failed else []
    if cut or left_out:
        said.append(
            f"the {args.minutes:g}-minute budget (--minutes) ran out"
            + (f" in {cut[0]}" if cut else "")
            + (f", leaving out {', '.join(left_out)}" if left_out else "")
            + " (the summaries hold what finished)"
        )
    if said:
        sys.exit("; ".join(said))


if __name__ == "__main__":
    main()
