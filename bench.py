"""Speed and memory of qadapter-min, measured side by side with the naive way, as ratios; and the GPU check.

    python bench.py                                       # CPU: training step at Llama 3's vocabulary; decoding
    python bench.py --preset llama-3.1-8b --device cuda   # an 8B-shaped training step and decoding on a GPU
    python bench.py --plan                                # the memory plan per rank of the large presets
    python bench.py --check OUT_DIR                       # the GPU check (tools/gpu_check.sh runs it)

Training step (one pair, 512 tokens each side, the real 128256-word vocabulary, a small width so it runs
on a CPU): ours (hidden states, base pass under no_grad, the lean chunked objective) against the naive
step written the way the authors' code works (full fp32 logits of both passes, then the loss). Each runs
in a fresh process so its peak memory (the process's peak resident size above what it held before the
step) is its own. Both must give the same loss and LoRA gradients.

Decoding (tokens per second) at batch 1, 8 and 32, eager and compiled (--compile's decoding step): the
base model, and the customised policy's combined batch that reads the weights once (and at batch 1 its
two passes per token, adapter on and then off), each against the limit that reading every weight once
per step sets, at the read rate measured in the same run (the LM head's product). The training step
runs compiled too (train.py --compile), in its own process; its first step's time is the compilation.
With --preset, the step at that shape runs eagerly, then decoding, then the step again compiled.

The GPU check (--check OUT_DIR, which tools/gpu_check.sh runs; --cpu runs it on the CPU at a tiny
shape) is one prepared command for a bare machine with one GPU. Its parts run in this order, each adding
its numbers to OUT_DIR/summary.json and summary.md as soon as it has them (decoding's row by row), so a
run cut short still reports what it finished; docs/scaling.md says what each measures and why:
    1. parity     the test fixtures' logits, the objective and LoRA gradients, and greedy decoding on the
                  device in fp32 and bf16 (--cpu: bf16) against fp32 on the CPU
    2. step       the training step at the llama-3.1-8b shape, random bf16 weights, pairs of 512 tokens:
                  micro-batch 1 with checkpointing in a 24 GiB cap (a 4090's), then 4 pairs with and
                  without; time, tokens/s, MFU (6N FLOPs a token, N the weights without the embedding)
                  and HFU (8N with checkpointing's recompute), peak memory against the memory plan
    3. decoding   tokens/s at batch 1, 8 and 32, base model and customised policy, against the limit
                  that reading every weight once per step sets; batching's gain over one prompt
    4. compiled   decoding at batch 1 and 32 and the step of 4 pairs compiled (--compile), each first
                  call (the compilation) timed: last, as compiling takes the longest. With
                  --compile_backend aot_eager the same graphs run with PyTorch's kernels: seconds, and
                  times that are not --compile's.
Sized for 8 minutes on one H200; --minutes (8) makes sure of it: at the deadline an alarm stops the part
running, which keeps what it finished, and the parts after it are left out, marked so in the summaries.
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from qadapter_min import compiled as compiled_steps
from qadapter_min.generate import Decoder, generate, generate_batch
from qadapter_min.lora import adapter_disabled, add_lora, lora_layers
from qadapter_min.memory import training_memory_gib
from qadapter_min.model import ModelArgs, Transformer
from qadapter_min.objective import loss_from_logits
from qadapter_min.step import micro_batch_objective
from qadapter_min.weights import load_model
from toyworld.build import init_random_weights

ROOT = Path(__file__).resolve().parent


def llama3_shape(
    hidden: int, intermediate: int, layers: int, heads: int, rope_factor=8.0, tied=False, kv_heads=8, vocab=128256
) -> ModelArgs:
    """A Llama 3 shape: llama3 RoPE scaling by rope_factor from 8,192 positions (the published models' 8 key-value
    heads and 128,256 words unless given)."""
    rope = dict(rope_type="llama3", factor=rope_factor, low_freq_factor=1.0, high_freq_factor=4.0)
    rope.update(original_max_position_embeddings=8192)
    sizes = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab)
    heads = dict(num_attention_heads=heads, num_key_value_heads=kv_heads)
    return ModelArgs(**sizes, **heads, rope_scaling=rope, tie_word_embeddings=tied)


# Published shapes (the Llama 3.1 and 3.2 model cards), for random-weight timings and memory estimates.
PRESETS = {
    "llama-3.1-8b": llama3_shape(4096, 14336, 32, 32, 8.0),
    "llama-3.1-70b": llama3_shape(8192, 28672, 80, 64, 8.0),
    "llama-3.1-405b": llama3_shape(16384, 53248, 126, 128, 8.0),
    "llama-3.2-1b": llama3_shape(2048, 8192, 16, 32, 32.0, tied=True),
    "llama-3.2-3b": llama3_shape(3072, 8192, 28, 24, 32.0, tied=True),
}
CPU_ARGS = llama3_shape(256, 768, 2, 4, kv_heads=2)  # Llama 3's vocabulary, a width a CPU runs
CHECK_CPU_SHAPE = llama3_shape(128, 384, 4, 4, kv_heads=2, vocab=4096)  # the GPU check's --cpu form
# Dense bf16 tensor-core peaks (TFLOP/s) and memory bandwidths (GB/s) of cards people use.
CARDS = {"H200": (989, 4800), "H100": (989, 3350), "A100": (312, 2039), "4090": (165, 1008), "L40S": (362, 864)}
FIXTURES = ROOT / "tests" / "fixtures"
PARITY_MODELS = ("tiny-llama-tied", "tiny-llama-untied-sharded", "lm-eval-llama/model")
STEP_4 = {"micro_batch_pairs": 4, "gradient_checkpointing": False}  # the step the compiled one is set beside
CAP_GIB = 23.5  # an RTX 4090's 24 GiB less about 0.5 GiB that CUDA's context takes outside PyTorch's allocator


def build(args: ModelArgs, device, dtype, seed=0) -> Transformer:
    """Random weights of the given shape, made directly on the device (built on meta, then materialised)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    init_random_weights(model)
    model.requires_grad_(False)
    add_lora(model, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():  # a trained-looking adapter, so Q differs from the base logits
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.02)
    return model


def pair_batch(vocab_size, length=512, prompt=256, device="cpu", pairs=1):
    """Pairs of chosen and rejected replies, (2 * pairs, length) tokens, the last length - prompt of each row
    the reply."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (2 * pairs, length), generator=generator)
    response_mask = torch.zeros(2 * pairs, length, dtype=torch.bool)
    response_mask[:, prompt:] = True
    return tokens.to(device), response_mask.to(device)


def matmul_parameters(model) -> int:
    """N in the FLOP count 2N per token per pass: the base weights that enter matrix products (the
    embedding is a lookup, unless it is also the tied LM head)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name and "embed_tokens" not in name)
    return n + (model.embed_tokens.weight.numel() if model.args.tie_word_embeddings else 0)


def synchronize():
    """Wait for the GPU's queued work, so that a clock read after it has seen the work done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(work):
    """(work()'s result, its seconds), the GPU's queued work included."""
    synchronize()
    started = time.perf_counter()
    result = work()
    synchronize()
    return result, time.perf_counter() - started


def seconds_of(work, repeats: int, pick=statistics.median) -> float:
    """pick (the median, or min) of the seconds of work() after one warm-up (repeats 0: the one call's)."""
    times = [timed(work)[1] for _ in range(repeats + 1)]
    return pick(times[1:] or times)


# ------------------------------------------------------------------------------------------------
# The training step


def our_step(model, tokens, response_mask):
    """What train.py runs for a micro-batch (step.py), at the paper's Q-Adapter settings."""
    loss, _ = micro_batch_objective(model, tokens, response_mask)
    loss.backward()
    return loss


def naive_step(model, tokens, response_mask):
    with adapter_disabled(model):
        base_logits = model(tokens).float()  # (2, T, V) fp32, outside no_grad
    q_logits = model(tokens).float()  # (2, T, V) fp32
    loss, _ = loss_from_logits(q_logits, base_logits, tokens, response_mask)
    loss.backward()
    return loss


def time_step(step, model, tokens, response_mask, repeats):
    """(median seconds per step after a warm-up, loss, LoRA gradients of one step)."""
    losses = []

    def one_step():
        model.zero_grad(set_to_none=True)
        losses.append(step(model, tokens, response_mask))

    seconds = seconds_of(one_step, repeats)
    return seconds, losses[-1].item(), [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]


def cpu_step_worker(which, repeats, queue):
    """Runs in a fresh process: build, measure the resident size, run the step, report."""
    torch.set_num_threads(torch.get_num_threads())
    model = build(CPU_ARGS, "cpu", torch.float32)
    tokens, response_mask = pair_batch(CPU_ARGS.vocab_size)
    step = naive_step if which == "naive" else our_step
    first = 0.0
    if which == "compiled":  # its first step compiles: timed apart, then timed like the others
        compiled_steps.compile_for_training(model)
        first = seconds_of(lambda: step(model, tokens, response_mask), repeats=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seconds, loss, grads = time_step(step, model, tokens, response_mask, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    # numpy: pickled by value
    queue.put((seconds, peak / 1024**2, loss, [g.numpy() for g in grads], first))


def cpu_training_step(repeats):
    context = multiprocessing.get_context("spawn")
    results = {}
    for which in ("naive", "ours", "compiled"):
        queue = context.Queue()
        process = context.Process(target=cpu_step_worker, args=(which, repeats, queue))
        process.start()
        results[which] = queue.get()
        process.join()
    t_naive, m_naive, loss_naive, g_naive, _ = results["naive"]
    t_ours, m_ours, loss_ours, g_ours, _ = results["ours"]
    t_compiled, _, loss_compiled, g_compiled, first = results["compiled"]
    loss_error = abs(loss_ours - loss_naive) / abs(loss_naive)
    grad_error = max(abs(a - b).max() / max(abs(b).max(), 1e-30) for a, b in zip(g_ours, g_naive))
    print(
        f"training step, 1 pair x 512 tokens, vocabulary {CPU_ARGS.vocab_size}, width {CPU_ARGS.hidden_size}, "
        f"{CPU_ARGS.num_hidden_layers} layers, fp32, CPU ({torch.get_num_threads()} threads)"
    )
    print(f"  naive: {t_naive * 1000:8.0f} ms  peak {m_naive:6.2f} GiB")
    print(f"  ours:  {t_ours * 1000:8.0f} ms  peak {m_ours:6.2f} GiB")
    print(
        f"  ratio: time {t_ours / t_naive:.2f}x, peak memory {m_ours / m_naive:.2f}x "
        f"(same loss to {loss_error:.1e} relative, LoRA gradients to {grad_error:.1e})"
    )
    compiled_grad_error = max(abs(a - b).max() / max(abs(b).max(), 1e-30) for a, b in zip(g_compiled, g_ours))
    print(
        f"  ours, compiled (--compile): {t_compiled * 1000:.0f} ms, {t_ours / t_compiled:.2f}x faster than "
        f"eager; its first step, compiling, {first:.0f} s (loss to "
        f"{abs(loss_compiled - loss_ours) / abs(loss_ours):.1e} of eager's, LoRA gradients to "
        f"{compiled_grad_error:.1e})"
    )


def training_steps(args: ModelArgs, device: str, peak_tflops, repeats: int, configurations, length: int = 512):
    """(the model, N, a row of numbers per configuration (pairs, checkpointing, memory cap in GiB or None)),
    each pair's replies `length` tokens with the prompt."""
    model, cuda = build(args, device, torch.bfloat16), torch.device(device).type == "cuda"
    model.train()
    if cuda:
        torch.cuda.empty_cache()  # build's fp32 staging copy, so the cap below counts the model alone
    parameters = matmul_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for pairs, checkpointing, cap_gib in configurations:
        model.gradient_checkpointing = checkpointing
        tokens, response_mask = pair_batch(args.vocab_size, length, length // 2, device=device, pairs=pairs)
        row = dict(micro_batch_pairs=pairs, gradient_checkpointing=checkpointing, memory_cap_gib=cap_gib)
        row["tokens_per_step"] = tokens.numel()
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 1024**3 / total) if cap_gib else 1.0)
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds, loss, _ = time_step(our_step, model, tokens, response_mask, repeats)
        except torch.OutOfMemoryError:
            row["error"] = f"out of memory under the {cap_gib} GiB cap" if cap_gib else "out of memory"
            rows.append(row)
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        tokens_per_s = tokens.numel() / seconds
        plan = training_memory_gib(args, trainable, pairs, tokens.shape[1], weight_bytes=2, checkpointing=checkpointing)
        row.update(step_ms=seconds * 1000, tokens_per_s=tokens_per_s, loss=loss)
        row.update(plan_gib=sum(plan.values()), plan_parts_gib=plan)
        if peak_tflops:
            row["mfu"] = 6 * parameters * tokens_per_s / (peak_tflops * 1e12)
            row["hfu"] = (8 if checkpointing else 6) * parameters * tokens_per_s / (peak_tflops * 1e12)
        if cuda:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
            row["measured_over_plan"] = row["peak_memory_gib"] / row["plan_gib"]
        rows.append(row)
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return model, parameters, rows


def compiled_step(model, tokens, response_mask, repeats) -> tuple[float, float, float]:
    """The step again with each block compiled (train.py --compile), last: the model stays compiled.
    (median seconds, loss, seconds of its first call, which compiles)."""
    compiled_steps.compile_for_training(model.train())
    first = seconds_of(lambda: our_step(model, tokens, response_mask), repeats=0)
    seconds, loss, _ = time_step(our_step, model, tokens, response_mask, repeats)
    return seconds, loss, first


def preset_run(name, device, peak_tflops, bandwidth_gbs, repeats, decode_tokens):
    """One training step and decoding at a published shape, random bf16 weights (a GPU; a CPU runs it slowly)."""
    model, _, [row] = training_steps(PRESETS[name], device, peak_tflops, repeats, [(1, True, None)])
    print(
        f"{name}, random bf16 weights, 1 pair x 512 tokens, gradient checkpointing, "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    )
    line = f"  step {row['step_ms']:.0f} ms, {row['tokens_per_s']:.0f} tokens/s (loss {row['loss']:.3f})"
    if peak_tflops:  # 6N FLOPs per token (module docstring)
        line += f", MFU {row['mfu']:.1%} of {peak_tflops} TFLOP/s"
    print(line)
    detail = ", ".join(f"{k} {v:.2f}" for k, v in row["plan_parts_gib"].items())
    if "peak_memory_gib" in row:
        print(
            f"  peak memory {row['peak_memory_gib']:.2f} GiB; memory model {row['plan_gib']:.2f} GiB ({detail}); "
            f"measured / model = {row['measured_over_plan']:.2f}"
        )
    else:
        print(f"  memory model {row['plan_gib']:.2f} GiB ({detail})")
    decoding(model, decode_tokens, bandwidth_gbs=bandwidth_gbs)
    batched_decoding(model, new_tokens=decode_tokens)
    tokens, response_mask = pair_batch(PRESETS[name].vocab_size, device=device)
    seconds, loss, first = compiled_step(model, tokens, response_mask, repeats)
    print(
        f"{name}, the step again, compiled (--compile): {seconds * 1000:.0f} ms, "
        f"{row['step_ms'] / 1000 / seconds:.2f}x faster than eager; its first step, compiling, {first:.0f} s "
        f"(loss {loss:.3f})"
    )


# ------------------------------------------------------------------------------------------------
# Decoding


def bytes_read_per_step(model) -> int:
    """The bytes of weights a decoding step reads: every matrix once (LoRA's too); the embedding is a
    lookup of one row, unless it is also the tied LM head."""
    read = [p for name, p in model.named_parameters() if model.args.tie_word_embeddings or "embed_tokens" not in name]
    return sum(p.numel() * p.element_size() for p in read)


def head_product_seconds(model, rows: int, repeats: int = 20) -> float:
    """Seconds of the LM head's product with `rows` hidden states, the BLAS library alone: the fastest
    of `repeats` (on a shared machine the others wait for the neighbours)."""
    weight = model.head_weight.detach()
    hidden = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    return seconds_of(lambda: weight @ hidden.T, repeats, pick=min)


def read_rate_gbs(model) -> float:
    """How fast this machine reads weights, measured: the LM head's bytes over the time of its product
    with two rows, as a decoding step runs it (generate.next_token_logits)."""
    weight = model.head_weight
    return weight.numel() * weight.element_size() / head_product_seconds(model, 2) / 1e9


def decode_speed(model, policy_mode, new_tokens, batch_size=1, combined=True, compiled=False, prompt_length=32):
    """(tokens per second of greedy decoding after a prefill, all rows together, in the fastest of three
    stretches of new_tokens steps; seconds of the first one-token step, which for a compiled decoder is
    its compilation)."""
    prompts = torch.arange(1, prompt_length + 1).repeat(batch_size, 1)
    needed = compiled_steps.cache_length(prompt_length + 3 * new_tokens + 2, compiled)
    settings = dict(max_seq_len=needed, combined=combined, batch_size=batch_size, compiled=compiled)
    decoder = Decoder(model, policy_mode, **settings)
    logits = [decoder.feed(prompts.to(next(model.parameters()).device))]

    def steps(n):  # n greedy tokens more
        for _ in range(n):
            logits[0] = decoder.feed(logits[0].argmax(-1)[:, None])

    _, first = timed(lambda: steps(2))  # warm-up: compiling, and on a GPU recording the CUDA graph
    return max(batch_size * new_tokens / timed(lambda: steps(new_tokens))[1] for _ in range(3)), first


def decoding_rows(model, new_tokens, steps_limit, batch_sizes=(1, 8, 32), compiled=False, keep=lambda rows: None):
    """A row per policy and batch size: greedy tokens/s (decode_speed), against the limit of steps_limit
    steps a second (every weight read once per step: batch B gives B tokens a step), batching's gain over
    one prompt at a time, and the first step's seconds (a compiled step's compilation). keep(rows) after
    each row."""
    rows = []
    for policy_mode in ("base", "customised"):
        for batch_size in batch_sizes:
            speed, first = decode_speed(model, policy_mode, new_tokens, batch_size, compiled=compiled)
            alone = next((r["tokens_per_s"] for r in rows if (r["policy"], r["batch"]) == (policy_mode, 1)), speed)
            limit = batch_size * steps_limit
            row = dict(policy=policy_mode, compiled=compiled, batch=batch_size, tokens_per_s=speed)
            row.update(bandwidth_limit_tokens_per_s=limit, of_limit=speed / limit, gain_over_one_prompt=speed / alone)
            rows.append(dict(row, first_call_s=first))
            keep(rows)
    return rows


def decoding(model, new_tokens, bandwidth_gbs=None, batch_sizes=(1, 8, 32)):
    """Tokens/s at each batch size, eager and compiled, against the limit that reading the weights once
    per step sets: at the card's stated bandwidth, or (a CPU) at the read rate measured here, now."""
    model.eval()
    measured = bandwidth_gbs is None
    rate = read_rate_gbs(model) if measured else bandwidth_gbs
    steps_limit = rate * 1e9 / bytes_read_per_step(model)
    print(
        f"decoding, {new_tokens} greedy tokens per row after a 32-token prompt; a step reads "
        f"{bytes_read_per_step(model) / 1e6:.0f} MB of weights, at {rate:.1f} GB/s "
        + ("(measured now: the LM head's product)" if measured else "(the card's)")
        + f": at most {steps_limit:.1f} steps/s, B x that in tokens/s at batch B"
    )
    print(f"  {'':28}" + "".join(f"{f'batch {b}':>20}" for b in batch_sizes))
    rows = [
        r for compiled in (False, True) for r in decoding_rows(model, new_tokens, steps_limit, batch_sizes, compiled)
    ]
    for policy_mode, label in (("base", "base model"), ("customised", "customised, combined")):
        for compiled in (False, True):
            mine = [r for r in rows if (r["policy"], r["compiled"]) == (policy_mode, compiled)]
            cells = [f"{r['tokens_per_s']:.1f} ({r['of_limit']:.0%})" for r in mine]
            print(f"  {label + (', compiled' if compiled else ', eager'):28}" + "".join(f"{c:>20}" for c in cells))
    two_passes, _ = decode_speed(model, "customised", new_tokens, combined=False)
    combined, _ = decode_speed(model, "customised", new_tokens)
    print(
        f"  customised, two passes per token (adapter on, then off), eager, batch 1: {two_passes:.1f} "
        f"tokens/s: {combined / two_passes:.2f}x the combined batch's time per token"
    )
    first = [f"{r['policy']} batch {r['batch']} {r['first_call_s']:.1f} s" for r in rows if r["compiled"]]
    print(f"  compiled: first steps (compiling) {', '.join(first)}")


def batched_decoding(model, new_tokens, prompts_count=32, batch_sizes=(1, 8, 32)):
    """Greedy replies to prompts of 16 to 48 tokens, one prompt at a time and in batches: tokens/s, the
    replies checked equal (in bf16, counted: a batch's products round otherwise, and a near tie can
    go the other way), and the KV cache per row (each prompt is one row, two for the customised policy)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (prompts_count,), generator=generator).tolist()
    prompts = [torch.randint(1, model.args.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    args, element = model.args, next(model.parameters()).element_size()
    row_bytes = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * (48 + new_tokens) * element
    print(
        f"batched decoding, {new_tokens} greedy tokens after each of {prompts_count} prompts of 16-48 tokens "
        f"(KV cache {row_bytes / 2**20:.1f} MiB per row)"
    )
    for policy_mode in ("base", "customised"):
        settings = dict(stop_ids=[], max_new_tokens=new_tokens, policy_mode=policy_mode)
        alone, seconds = timed(lambda: [list(generate(model, prompt, **settings)) for prompt in prompts])
        one_at_a_time = prompts_count * new_tokens / seconds
        line = f"  {policy_mode:10} one prompt at a time {one_at_a_time:7.1f} tokens/s"
        for batch_size in batch_sizes:
            replies, seconds = timed(lambda: in_batches(model, prompts, batch_size, settings))
            speed = prompts_count * new_tokens / seconds
            same = sum(r == a for r, a in zip(replies, alone))
            differ = ""
            if same < prompts_count:  # in fp32 a fault; in bf16 a batch's products round otherwise
                exact = next(model.parameters()).dtype == torch.float32
                differ = f", {'REPLIES DIFFER' if exact else 'bf16'}: {same}/{prompts_count} the same"
            line += f" | batch {batch_size}: {speed:7.1f} ({speed / one_at_a_time:.1f}x{differ})"
        print(line)
    head_product_gains(model, batch_sizes)


def in_batches(model, prompts, batch_size, settings) -> list:
    """The greedy replies to prompts, batch_size of them decoded together."""
    starts = range(0, len(prompts), batch_size)
    return [reply for i in starts for reply in generate_batch(model, prompts[i : i + batch_size], **settings)]


def head_product_gains(model, batch_sizes):
    """The gain that batching can give at most where the LM head dominates: the time per prompt of the head's
    matrix product alone (the BLAS library, no model code) for a batch of B prompts against one prompt,
    with one row per prompt for the base model and two for the customised policy."""
    line = "  LM head product alone, per prompt against one prompt:"
    for policy_mode, rows_per_prompt in (("base", 1), ("customised", 2)):
        # one row runs as two (generate.next_token_logits)
        alone = head_product_seconds(model, max(rows_per_prompt, 2))
        batched = {b: head_product_seconds(model, b * rows_per_prompt) for b in batch_sizes[1:]}
        gains = ", ".join(f"batch {b} {b * alone / seconds:.1f}x" for b, seconds in batched.items())
        line += f" {policy_mode} {gains};"
    print(line.rstrip(";"))


def memory_plans(presets=("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"), ranks=(4, 8, 16)):
    """The memory model's estimate per rank (GiB) of one training step: 1 pair x 512 tokens, bf16 weights,
    gradient checkpointing, LoRA r 8 on q_proj and v_proj; each rank a whole copy (DDP) or a shard (FSDP)."""
    print("memory per rank (GiB, estimated), 1 pair x 512 tokens, bf16, gradient checkpointing, LoRA r 8 on q/v")
    print(f"{'':16}{'DDP':>8}" + "".join(f"{f'FSDP x{r}':>10}" for r in ranks))
    for name in presets:
        args = PRESETS[name]
        heads = args.num_attention_heads + args.num_key_value_heads  # q_proj's and v_proj's outputs
        lora = args.num_hidden_layers * 8 * (2 * args.hidden_size + heads * args.head_dim)
        plans = [training_memory_gib(args, lora, 1, 512)] + [
            training_memory_gib(args, lora, 1, 512, fsdp_ranks=r) for r in ranks
        ]
        print(f"{name:16}" + "".join(f"{sum(plan.values()):{8 if i == 0 else 10}.1f}" for i, plan in enumerate(plans)))


# ------------------------------------------------------------------------------------------------
# The GPU check: parts, each adding its numbers to the summaries


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


def parity(device: str) -> dict:
    forms = [("fp32", torch.float32), ("bf16", torch.bfloat16)] if device == "cuda" else [("bf16", torch.bfloat16)]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on the GPU means fp32
    tokens = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    numbers = {"logits": {}, "objective": {}, "greedy": {}}
    for fixture in PARITY_MODELS:
        reference = load_model(FIXTURES / fixture)(tokens)
        for form, dtype in forms:
            logits = load_model(FIXTURES / fixture, dtype=dtype, device=device)(tokens.to(device)).float().cpu()
            difference, agreement = (logits - reference).abs(), (logits.argmax(-1) == reference.argmax(-1)).float()
            top1 = agreement.mean().item()
            numbers["logits"][f"{fixture} {form}"] = dict(
                max_abs_diff=difference.max().item(), mean_abs_diff=difference.mean().item(), top1_agreement=top1
            )
    response_mask = torch.zeros_like(tokens, dtype=torch.bool)
    response_mask[:, 24:] = True
    reference_loss, reference_grads = objective_and_grads(torch.float32, "cpu", tokens, response_mask)
    prompts = [torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 13, 17)]
    reference_replies = greedy_replies(adapted_model(torch.float32, "cpu"), prompts)
    for form, dtype in forms:
        loss, grads = objective_and_grads(dtype, device, tokens, response_mask)
        grad_diff = max((g - r).abs().max().item() / r.abs().max().item() for g, r in zip(grads, reference_grads))
        numbers["objective"][form] = dict(loss_relative_diff=abs(loss - reference_loss) / abs(reference_loss))
        numbers["objective"][form]["grad_max_relative_diff"] = grad_diff
        replies = greedy_replies(adapted_model(dtype, device), prompts)
        agree = [
            next((i for i, (a, b) in enumerate(zip(r, ref)) if a != b), len(ref))
            for r, ref in zip(replies, reference_replies)
        ]
        same = f"{sum(a == 32 for a in agree)}/{len(prompts)}"
        numbers["greedy"][form] = dict(identical_replies=same, tokens_before_first_difference=agree)
    return numbers


def adapted_model(dtype, device):
    """The lm-eval fixture's model with LoRA whose B is drawn at random, not zero: Q differs from pi1."""
    torch.manual_seed(0)
    model = add_lora(load_model(FIXTURES / "lm-eval-llama/model", dtype=dtype, device=device), r=4, alpha=8, dropout=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            generator = torch.Generator().manual_seed(layer.index)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
    return model


def objective_and_grads(dtype, device, tokens, response_mask):
    model = adapted_model(dtype, device)
    loss, _ = micro_batch_objective(model, tokens.to(device), response_mask.to(device))
    loss.backward()
    return loss.item(), [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]


def greedy_replies(model, prompts):
    return [list(generate(model, p, stop_ids=[], max_new_tokens=32, policy_mode="customised")) for p in prompts]


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


TITLES = dict(device="Device", parity="1. Parity against fp32 on the CPU", step="2. Training step")
TITLES.update(decoding="3. Decoding", compiled="4. Compiled (--compile): decoding, and the step of 4 pairs")
LABELS = {"backend": "torch.compile backend"}


def shown(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> list[str]:
    """rows as a markdown table, a column per key (nested numbers flattened: plan_parts_gib.weights)."""
    flat = [{k: v for k, v in row.items() if not isinstance(v, dict)} for row in rows]
    for row, whole in zip(flat, rows):
        row.update({f"{k}.{part}": v for k, d in whole.items() if isinstance(d, dict) for part, v in d.items()})
    columns = list(dict.fromkeys(k for row in flat for k in row))
    return [
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *("| " + " | ".join(shown(row.get(c, "")) for c in columns) + " |" for row in flat),
        "",
    ]


def markdown(data: dict) -> str:
    """summary.md: the facts, then a section per part, its numbers as lists and tables (summary.json's keys);
    a part cut short by the budget, or failed, or left out, says so."""
    stated = "; no stated peak (not a card bench.py lists): the measured numbers stand in"
    facts = ", ".join(f"{k} {v}" for k, v in data.items() if k not in ("device", "parts"))
    lines = [f"# GPU check: {data['device']}", "", facts + ("" if data["stated_peak_tflops"] else stated), ""]
    for name, numbers in data["parts"].items():
        lines += [f"## {TITLES[name]}", ""]
        if "error" in numbers:
            stopped = "stopped" if numbers["error"].startswith(OutOfTime.__name__) else "failed"
            lines += [f"**{name} {stopped}** after {numbers['seconds']:.0f} s: {numbers['error']}", ""]
        if "left_out" in numbers:
            lines += [f"**{name} left out**: {numbers['left_out']}", ""]
        scalars = {
            k: v for k, v in numbers.items() if not isinstance(v, dict | list) and k not in ("error", "left_out")
        }
        lines += [f"- {LABELS.get(k, k)}: {shown(v)}" for k, v in scalars.items()] + [""] * bool(scalars)
        for key, value in numbers.items():
            if key == "rows":
                lines += markdown_table(value)
            elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):  # parity's
                lines += [f"{key}:", ""] + markdown_table([{key: k, **v} for k, v in value.items()])
            elif isinstance(value, dict):  # the compiled step's
                lines += [f"{key}: " + ", ".join(f"{k} {shown(v)}" for k, v in value.items()), ""]
    return "\n".join(lines) + "\n"


def check(args):
    """The GPU check's parts in order (module docstring), under the --minutes budget."""
    compiled_steps.BACKEND = args.compile_backend
    device = "cpu" if args.cpu else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    stated_peak, stated_bandwidth = next((v for k, v in CARDS.items() if k in name and not args.cpu), (None, None))
    facts = dict(device=name, date=time.strftime("%Y-%m-%d"), torch=torch.__version__, cuda=torch.version.cuda)
    facts.update(python=platform.python_version(), stated_peak_tflops=stated_peak)
    summary = Summary(args.out, {**facts, "stated_bandwidth_gbs": stated_bandwidth})
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
        "device", lambda keep: dict(matmul_tflops=matmul_tflops(device), copy_bandwidth_gbs=copy_bandwidth_gbs(device))
    )
    part("parity", lambda keep: parity(device))
    shape, decode_tokens, length = (CHECK_CPU_SHAPE, 8, 128) if args.cpu else (PRESETS["llama-3.1-8b"], 64, 512)
    measured, held = summary.data["parts"]["device"], {}
    peak, peak_source = (stated_peak, "stated peak") if stated_peak else (measured.get("matmul_tflops"), "measured")

    def step(keep):
        configurations = [(1, True, None if args.cpu else CAP_GIB), (4, True, None), (4, False, None)]
        repeats = 1 if args.cpu else 3
        held["model"], parameters, rows = training_steps(shape, device, peak, repeats, configurations, length)
        shape_name = "tiny (CPU)" if args.cpu else "llama-3.1-8b"
        return dict(shape=shape_name, parameters=parameters, rows=rows, peak_tflops=peak, peak_source=peak_source)

    part("step", step)
    measured_bandwidth = measured.get("copy_bandwidth_gbs")
    bandwidth, source = (stated_bandwidth, "stated") if stated_bandwidth else (measured_bandwidth, "measured by a copy")

    def decode(keep, batch_sizes=(1, 8, 32), compiled=False):
        if "model" not in held:  # the step part failed
            held["model"] = build(shape, device, torch.bfloat16)
        model = held["model"].eval()
        weight_bytes = bytes_read_per_step(model)
        numbers = dict(weight_gb=weight_bytes / 1e9, new_tokens=decode_tokens, bandwidth_gbs=bandwidth)
        numbers.update(bandwidth_source=source, rows=[])
        keep_rows, limit = lambda rows: keep({**numbers, "rows": rows}), bandwidth * 1e9 / weight_bytes
        numbers["rows"] = decoding_rows(model, decode_tokens, limit, batch_sizes, compiled, keep_rows)
        return numbers

    part("decoding", decode)

    def compiled(keep):
        """Decoding at batch 1 and 32 and the step of 4 pairs without checkpointing, compiled: last, as
        compiling takes the longest; the model stays compiled afterwards."""
        keep({"backend": args.compile_backend})
        numbers = decode(lambda n: keep({**n, "backend": args.compile_backend}), (1, 32), compiled=True)
        eager = next((r for r in summary.data["parts"]["step"].get("rows", []) if r == {**r, **STEP_4}), None)
        tokens, response_mask = pair_batch(shape.vocab_size, length, length // 2, device=device, pairs=4)
        held["model"].gradient_checkpointing = False
        seconds, loss, first = compiled_step(held["model"], tokens, response_mask, 1 if args.cpu else 3)
        eager_ms = eager and eager.get("step_ms")
        numbers["step"] = dict(step_ms=seconds * 1000, first_call_s=first, loss=loss, eager_step_ms=eager_ms)
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
        where = (f" in {cut[0]}" if cut else "") + (f", leaving out {', '.join(left_out)}" if left_out else "")
        said.append(f"the {args.minutes:g}-minute budget (--minutes) ran out{where} (the summaries hold what finished)")
    if said:
        sys.exit("; ".join(said))


def main():
    # compiling from nothing, as on a fresh machine: not from the traces of earlier runs
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published Llama shape, random bf16 weights")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--decode_tokens", type=int, default=64, help="tokens decoded per decoding measurement")
    p.add_argument("--peak_tflops", type=float, help="the card's dense bf16 peak (default: looked up by name)")
    p.add_argument("--bandwidth_gbs", type=float, help="the card's memory bandwidth (default: looked up)")
    p.add_argument("--plan", action="store_true", help="print the memory plan per rank of the large presets")
    check_flags = p.add_argument_group("the GPU check (tools/gpu_check.sh runs bench.py --check)")
    check_flags.add_argument("--check", action="store_true", help="run the GPU check, writing its summaries to OUT_DIR")
    check_flags.add_argument("out", nargs="?", type=Path, metavar="OUT_DIR", help="where --check writes its summaries")
    check_flags.add_argument("--cpu", action="store_true", help="run every part of the check on the CPU, a tiny shape")
    check_flags.add_argument("--no_compiled", action="store_true", help="leave out part 4, the longest to start")
    backend = "part 4's torch.compile backend: --compile's, or its graphs run with PyTorch's kernels (seconds)"
    check_flags.add_argument("--compile_backend", choices=("inductor", "aot_eager"), default="inductor", help=backend)
    check_flags.add_argument("--minutes", type=float, default=8.0, help="stop at this many, keeping what finished")
    args = p.parse_args()
    bench_flags = ("preset", "device", "repeats", "decode_tokens", "peak_tflops", "bandwidth_gbs", "plan")
    check_only = ("out", "cpu", "no_compiled", "compile_backend", "minutes")
    set_flags = lambda names: [f"--{n}" for n in names if getattr(args, n) != p.get_default(n)]
    mine, theirs = set_flags(check_only), set_flags(bench_flags)
    if args.check:
        if args.out is None:
            p.error("--check needs OUT_DIR, the directory for its summaries")
        if theirs:
            p.error(f"{' '.join(theirs)} sets bench.py's own measurements, which the GPU check does not take: drop it")
        if args.no_compiled and args.compile_backend != "inductor":
            p.error("--compile_backend chooses part 4's backend and --no_compiled leaves part 4 out: pass one")
        if args.minutes <= 0:
            p.error(f"--minutes {args.minutes:g}: the budget must be more than 0 minutes")
        if not args.cpu and not torch.cuda.is_available():
            p.error("no GPU is visible; run on a machine with one, or add --cpu")
        return check(args)
    if mine:
        p.error(f"{' '.join(mine).replace('--out', 'OUT_DIR')} belongs to the GPU check: add --check, or drop it")
    if args.plan:
        memory_plans()
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible; run on a machine with one, or use --device cpu")
    if args.preset:
        card = (None, None)
        if args.device == "cuda":
            card = next((v for k, v in CARDS.items() if k in torch.cuda.get_device_name()), (None, None))
        peak, bandwidth = args.peak_tflops or card[0], args.bandwidth_gbs or card[1]
        preset_run(args.preset, args.device, peak, bandwidth, args.repeats, args.decode_tokens)
        return
    cpu_training_step(args.repeats)
    model = build(CPU_ARGS, "cpu", torch.float32)
    decoding(model, args.decode_tokens)
    batched_decoding(model, new_tokens=16)


if __name__ == "__main__":
    main()
