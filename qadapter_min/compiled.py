"""--compile: torch.compile of the decoding step and of the training forward pass, gpt-fast's recipe.

What stops plain PyTorch from running a decoding step at the speed the weights can be read is the
Python around the kernels: a few hundred small operations launched one by one, each with its own
overhead. torch.compile traces a step once into fused kernels (on a GPU, replayed as one CUDA graph);
that pays only if the next step can reuse the trace, so a decoding step keeps its shapes and its Python
values fixed from token to token:

    KV cache       a buffer of a fixed size per layer, written in place at a tensor of columns
                   (model.KVCache); attention runs over the whole buffer, masked, so the keys' shape
                   does not grow. (Were the layers slices of one buffer, a compiled step would
                   rewrite all of it: the customised policy at batch 8 over 4096 columns took
                   113 ms a step so, 28 ms with a buffer per layer, on 2 CPU cores.)
    positions      tensors, counted outside the step (generate.Decoder)
    finished rows  stay in the batch (a smaller batch would be a new shape) and are fed a token whose
                   logits nobody reads
    the prefill    runs eagerly: its length changes with every prompt

So a step compiles once per batch shape, policy and adapter setting: the first call of each pays the
compilation (measured in bench.py), and the rest run the compiled code. The shapes are compiled as
they are, not as symbols (dynamic=False): a step traced for any batch size runs several times slower
on a CPU. The cache's length is rounded up to a multiple of CACHE_COLUMNS, so that batches of nearby
lengths share a compiled step.

Training compiles each block rather than the whole model, as torchtune does: the blocks run the
same code on their own weights, so one trace serves all of them (an 8B model's 32 blocks compile
once, not as one graph 32 blocks long), and a layer's number, which its LoRA dropout reads, is a
value of the trace rather than a reason for a new one. A step traces a block three ways: under the
adapter with gradients, for the first block (its input needs none) and the others, and without
gradients for the base pass; a second micro-batch length traces each once more, for any length. The
embedding, the final norm and the chunked objective (lean_head.py) stay eager: the objective's chunks
are large products already, and their number changes with every micro-batch.

BACKEND is torch.compile's backend: "inductor" generates the fused kernels, which is --compile's
point and takes its seconds per trace (C++ built with a compiler on a CPU). "aot_eager" captures the
same graphs, forward and backward, and runs them with PyTorch's own kernels: no code generation, so
seconds instead of minutes, which is how the suite and the GPU check's --compile_backend check the
capture on a small CPU.
"""

import torch

CACHE_COLUMNS = 256
BACKEND = "inductor"
COMPILED = {}  # (function, backend, mode) -> its compiled form, shared by every decoder


def cache_length(needed: int, compiled: bool) -> int:
    """The KV cache's columns: as many as needed, rounded up to a multiple of CACHE_COLUMNS when
    compiled."""
    return -(-needed // CACHE_COLUMNS) * CACHE_COLUMNS if compiled else needed


def compiled(function, device):
    """function under torch.compile, for the shapes it is called with; on a GPU in "reduce-overhead"
    mode, which replays each step as a CUDA graph: one launch instead of hundreds."""
    key = function, BACKEND, reduce_overhead(device)
    if key not in COMPILED:
        # a trace per policy, batch shape and --scale point: more than the default limit of 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        COMPILED[key] = torch.compile(function, backend=BACKEND, mode=key[2], dynamic=False)
    return COMPILED[key]


def reduce_overhead(device):
    """inductor's mode on a GPU: "reduce-overhead" (CUDA graphs); None otherwise."""
    cuda = torch.device(device).type == "cuda"
    return "reduce-overhead" if cuda and BACKEND == "inductor" else None


def decoding_step(step, caches, device):
    """The compiled form of a decoding step over these caches. A CUDA graph replays fixed addresses:
    the caches' buffers, written in place every step, are marked as staying where they are."""
    for cache in caches:
        for tensor in (*cache.keys, *cache.values, cache.length, cache.valid):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)
    return compiled(step, device)


def compile_for_training(model):
    """Each block's forward pass compiled in place (nn.Module.compile): train.py --compile."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True  # LoRA's layer number: a value
    for block in model.layers:  # no CUDA graphs: a step's launches are few beside its products,
        block.compile(backend=BACKEND)  # and every new micro-batch length would record another
    return model
