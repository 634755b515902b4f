"""Speed and memory of qadapter-min, measured side by side with the naive way, as ratios.

    python bench.py                                       # CPU: training step at Llama 3's vocabulary; decoding
    python bench.py --preset llama-3.1-8b --device cuda   # an 8B-shaped training step and decoding on a GPU

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
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time

import torch

from qadapter_min import compiled as compiled_steps
from qadapter_min.generate import Decoder, generate, generate_batch
from qadapter_min.lora import adapter_disabled, add_lora, lora_layers
from qadapter_min.memory import training_memory_gib
from qadapter_min.model import ModelArgs, Transformer
from qadapter_min.objective import loss_from_logits
from qadapter_min.step import micro_batch_objective
from toyworld.build import init_random_weights


def llama3_shape(
    hidden: int, intermediate: int, layers: int, heads: int, rope_factor=8.0, tied=False, kv_heads=8, vocab=128256
) -> ModelArgs:
    """A Llama 3 shape: llama3 RoPE scaling by rope_factor from 8,192 positions (the published models' 8 key-value
    heads and 128,256 words unless given)."""
    rope = dict(
        rope_type="llama3",
        factor=rope_factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    return ModelArgs(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        rope_scaling=rope,
        tie_word_embeddings=tied,
    )


# Published shapes (the Llama 3.1 and 3.2 model cards), for random-weight timings and memory estimates.
PRESETS = {
    "llama-3.1-8b": llama3_shape(4096, 14336, 32, 32, 8.0),
    "llama-3.1-70b": llama3_shape(8192, 28672, 80, 64, 8.0),
    "llama-3.1-405b": llama3_shape(16384, 53248, 126, 128, 8.0),
    "llama-3.2-1b": llama3_shape(2048, 8192, 16, 32, 32.0, tied=True),
    "llama-3.2-3b": llama3_shape(3072, 8192, 28, 24, 32.0, tied=True),
}


CPU_ARGS = llama3_shape(256, 768, 2, 4, kv_heads=2)  # Llama 3's vocabulary, a width a CPU runs
# Dense bf16 tensor-core peaks (TFLOP/s) and memory bandwidths (GB/s) of cards people use.
CARDS = {"H200": (989, 4800), "H100": (989, 3350), "A100": (312, 2039), "4090": (165, 1008), "L40S": (362, 864)}


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


def time_step(step, model, tokens, response_mask, repeats, synchronize=lambda: None):
    """(median seconds per step, loss, LoRA gradients of one step)."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        synchronize()
        started = time.perf_counter()
        loss = step(model, tokens, response_mask)
        synchronize()
        times.append(time.perf_counter() - started)
    grads = [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]
    return statistics.median(times[1:]), loss.item(), grads


def cpu_step_worker(which, repeats, queue):
    """Runs in a fresh process: build, measure the resident size, run the step, report."""
    torch.set_num_threads(torch.get_num_threads())
    model = build(CPU_ARGS, "cpu", torch.float32)
    tokens, response_mask = pair_batch(CPU_ARGS.vocab_size)
    step = naive_step if which == "naive" else our_step
    first = 0.0
    if which == "compiled":  # its first step compiles: timed apart, then timed like the others
        compiled_steps.compile_for_training(model)
        started = time.perf_counter()
        step(model, tokens, response_mask)
        first = time.perf_counter() - started
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
    (t_naive, m_naive, loss_naive, g_naive, _), (t_ours, m_ours, loss_ours, g_ours, _) = (
        results["naive"],
        results["ours"],
    )
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


def bytes_read_per_step(model) -> int:
    """The bytes of weights a decoding step reads: every matrix once (LoRA's too); the embedding is a
    lookup of one row, unless it is also the tied LM head."""
    tied = model.args.tie_word_embeddings
    return sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if tied or "embed_tokens" not in name
    )


def head_product_seconds(model, rows: int, repeats: int = 20) -> float:
    """Seconds of the LM head's product with `rows` hidden states, the BLAS library alone: the fastest
    of `repeats` (on a shared machine the others wait for the neighbours)."""
    weight = model.head_weight.detach()
    hidden = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    weight @ hidden.T
    times = []
    for _ in range(repeats):
        synchronize(model)
        started = time.perf_counter()
        weight @ hidden.T
        synchronize(model)
        times.append(time.perf_counter() - started)
    return min(times)


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
    decoder = Decoder(
        model, policy_mode, max_seq_len=needed, combined=combined, batch_size=batch_size, compiled=compiled
    )
    logits = decoder.feed(prompts.to(next(model.parameters()).device))
    synchronize(model)
    started = time.perf_counter()
    for _ in range(2):  # warm-up: compiling, and on a GPU recording the CUDA graph
        logits = decoder.feed(logits.argmax(-1)[:, None])
    synchronize(model)
    first = time.perf_counter() - started
    speeds = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(new_tokens):
            logits = decoder.feed(logits.argmax(-1)[:, None])
        synchronize(model)
        speeds.append(batch_size * new_tokens / (time.perf_counter() - started))
    return max(speeds), first


def synchronize(model):
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def decoding(model, new_tokens, bandwidth_gbs=None, batch_sizes=(1, 8, 32)):
    """Tokens/s at each batch size, eager and compiled, against the limit that reading the weights once
    per step sets: at the card's stated bandwidth, or (a CPU) at the read rate measured here, now."""
    model.eval()
    measured = bandwidth_gbs is None
    rate = read_rate_gbs(model) if measured else bandwidth_gbs
    steps_limit = rate * 1e9 / bytes_read_per_step(model)  # steps/s: batch B gives B tokens a step
    print(
        f"decoding, {new_tokens} greedy tokens per row after a 32-token prompt; a step reads "
        f"{bytes_read_per_step(model) / 1e6:.0f} MB of weights, at {rate:.1f} GB/s "
        + ("(measured now: the LM head's product)" if measured else "(the card's)")
        + f": at most {steps_limit:.1f} steps/s, B x that in tokens/s at batch B"
    )
    print(f"  {'':28}" + "".join(f"{f'batch {b}':>20}" for b in batch_sizes))
    first_steps = []
    for policy_mode, label in (("base", "base model"), ("customised", "customised, combined")):
        for compiled in (False, True):
            cells = ""
            for batch_size in batch_sizes:
                speed, first = decode_speed(model, policy_mode, new_tokens, batch_size, True, compiled)
                cells += f"{f'{speed:.1f} ({speed / (batch_size * steps_limit):.0%})':>20}"
                if compiled:
                    first_steps.append(f"{policy_mode} batch {batch_size} {first:.1f} s")
            print(f"  {label + (', compiled' if compiled else ', eager'):28}{cells}")
    two_passes, _ = decode_speed(model, "customised", new_tokens, combined=False)
    combined, _ = decode_speed(model, "customised", new_tokens)
    print(
        f"  customised, two passes per token (adapter on, then off), eager, batch 1: {two_passes:.1f} "
        f"tokens/s: {combined / two_passes:.2f}x the combined batch's time per token"
    )
    print(f"  compiled: first steps (compiling) {', '.join(first_steps)}")


def batched_decoding(model, new_tokens, prompts_count=32, batch_sizes=(1, 8, 32)):
    """Greedy replies to prompts of 16 to 48 tokens, one prompt at a time and in batches: tokens/s, the
    replies checked equal (in bf16, counted: a batch's products round otherwise, and a near tie can
    go the other way), and the KV cache per row (each prompt is one row, two for the customised policy)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (prompts_count,), generator=generator).tolist()
    prompts = [torch.randint(1, model.args.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    args = model.args
    row_bytes = (
        2
        * args.num_hidden_layers
        * args.num_key_value_heads
        * args.head_dim
        * (48 + new_tokens)
        * next(model.parameters()).element_size()
    )
    print(
        f"batched decoding, {new_tokens} greedy tokens after each of {prompts_count} prompts of 16-48 tokens "
        f"(KV cache {row_bytes / 2**20:.1f} MiB per row)"
    )
    for policy_mode in ("base", "customised"):
        settings = dict(stop_ids=[], max_new_tokens=new_tokens, policy_mode=policy_mode)
        synchronize(model)
        started = time.perf_counter()
        alone = [list(generate(model, prompt, **settings)) for prompt in prompts]
        synchronize(model)
        one_at_a_time = prompts_count * new_tokens / (time.perf_counter() - started)
        line = f"  {policy_mode:10} one prompt at a time {one_at_a_time:7.1f} tokens/s"
        for batch_size in batch_sizes:
            synchronize(model)
            started = time.perf_counter()
            replies = [
                r
                for i in range(0, prompts_count, batch_size)
                for r in generate_batch(model, prompts[i : i + batch_size], **settings)
            ]
            synchronize(model)
            speed = prompts_count * new_tokens / (time.perf_counter() - started)
            same = sum(r == a for r, a in zip(replies, alone))
            differ = ""
            if same < prompts_count:  # in fp32 a fault; in bf16 a batch's products round otherwise
                exact = next(model.parameters()).dtype == torch.float32
                differ = f", {'REPLIES DIFFER' if exact else 'bf16'}: {same}/{prompts_count} the same"
            line += f" | batch {batch_size}: {speed:7.1f} ({speed / one_at_a_time:.1f}x{differ})"
        print(line)
    head_product_gains(model, batch_sizes)


def head_product_gains(model, batch_sizes):
    """The gain that batching can give at most where the LM head dominates: the time per prompt of the head's
    matrix product alone (the BLAS library, no model code) for a batch of B prompts against one prompt,
    with one row per prompt for the base model and two for the customised policy."""
    line = "  LM head product alone, per prompt against one prompt:"
    for policy_mode, rows_per_prompt in (("base", 1), ("customised", 2)):
        # one row runs as two (generate.next_token_logits)
        alone = head_product_seconds(model, max(rows_per_prompt, 2))
        gains = ", ".join(
            f"batch {b} {b * alone / head_product_seconds(model, b * rows_per_prompt):.1f}x" for b in batch_sizes[1:]
        )
        line += f" {policy_mode} {gains};"
    print(line.rstrip(";"))


def memory_plans(presets=("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"), ranks=(4, 8, 16)):
    """The memory model's estimate per rank (GiB) of one training step: 1 pair x 512 tokens, bf16 weights,
    gradient checkpointing, LoRA r 8 on q_proj and v_proj; each rank a whole copy (DDP) or a shard (FSDP)."""
    print("memory per rank (GiB, estimated), 1 pair x 512 tokens, bf16, gradient checkpointing, LoRA r 8 on q/v")
    print(f"{'':16}{'DDP':>8}" + "".join(f"{f'FSDP x{r}':>10}" for r in ranks))
    for name in presets:
        args = PRESETS[name]
        lora = (
            args.num_hidden_layers
            * 8
            * (2 * args.hidden_size + (args.num_attention_heads + args.num_key_value_heads) * args.head_dim)
        )
        plans = [training_memory_gib(args, lora, 1, 512)] + [
            training_memory_gib(args, lora, 1, 512, fsdp_ranks=r) for r in ranks
        ]
        print(f"{name:16}" + "".join(f"{sum(plan.values()):{8 if i == 0 else 10}.1f}" for i, plan in enumerate(plans)))


def preset_run(name, device, peak_tflops, bandwidth_gbs, repeats, decode_tokens):
    """One training step and decoding at a published shape, random bf16 weights (a GPU; a CPU runs it slowly)."""
    args = PRESETS[name]
    cuda = device == "cuda"
    model = build(args, device, torch.bfloat16)
    model.gradient_checkpointing = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = training_memory_gib(args, trainable, micro_batch_size=1, max_len=512, weight_bytes=2)
    tokens, response_mask = pair_batch(args.vocab_size, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    seconds, loss, _ = time_step(
        our_step, model, tokens, response_mask, repeats, torch.cuda.synchronize if cuda else (lambda: None)
    )
    parameters = matmul_parameters(model)
    tokens_per_s = tokens.numel() / seconds
    print(
        f"{name}, random bf16 weights, 1 pair x 512 tokens, gradient checkpointing, "
        f"{torch.cuda.get_device_name() if cuda else 'CPU'}"
    )
    line = f"  step {seconds * 1000:.0f} ms, {tokens_per_s:.0f} tokens/s (loss {loss:.3f})"
    if peak_tflops:
        # 6N FLOPs per token: 2N for the adapter pass forward, 2N for its backward through the activations
        # (the frozen weights need no weight gradients), 2N for the base pass (checkpointing adds 2N more).
        line += f", MFU {6 * parameters * tokens_per_s / (peak_tflops * 1e12):.1%} of {peak_tflops} TFLOP/s"
    print(line)
    modelled = sum(estimate.values())
    detail = ", ".join(f"{k} {v:.2f}" for k, v in estimate.items())
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 1024**3
        print(
            f"  peak memory {peak:.2f} GiB; memory model {modelled:.2f} GiB ({detail}); "
            f"measured / model = {peak / modelled:.2f}"
        )
    else:
        print(f"  memory model {modelled:.2f} GiB ({detail})")
    decoding(model, decode_tokens, bandwidth_gbs=bandwidth_gbs)
    batched_decoding(model, new_tokens=decode_tokens)
    # last: the blocks stay compiled for training (train.py --compile), which decoding's step would trace
    compiled_steps.compile_for_training(model.train())
    started = time.perf_counter()
    our_step(model, tokens, response_mask)
    synchronize(model)
    first = time.perf_counter() - started
    compiled, compiled_loss, _ = time_step(our_step, model, tokens, response_mask, repeats, lambda: synchronize(model))
    print(
        f"{name}, the step again, compiled (--compile): {compiled * 1000:.0f} ms, "
        f"{seconds / compiled:.2f}x faster than eager; its first step, compiling, {first:.0f} s "
        f"(loss {compiled_loss:.3f})"
    )


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
    p.add_argument(
        "--plan", action="store_true", help="print the memory plan per rank of the large presets, DDP and FSDP"
    )
    args = p.parse_args()
    if args.plan:
        memory_plans()
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible; run on a machine with one, or use --device cpu")
    if args.preset:
        card = (None, None)
        if args.device == "cuda":
            card = next((v for k, v in CARDS.items() if k in torch.cuda.get_device_name()), (None, None))
        preset_run(
            args.preset,
            args.device,
            args.peak_tflops or card[0],
            args.bandwidth_gbs or card[1],
            args.repeats,
            args.decode_tokens,
        )
        return
    cpu_training_step(args.repeats)
    model = build(CPU_ARGS, "cpu", torch.float32)
    decoding(model, args.decode_tokens)
    batched_decoding(model, new_tokens=16)


if __name__ == "__main__":
    main()
