"""The Llama 3.1 modules against slow, obvious versions written from the formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from bench import PRESETS
from conftest import tiny_args
from qadapter_min.model import Attention, KVCache, ModelArgs, Transformer, rope_cos_sin, rope_frequencies


def slow_llama3_frequencies(head_dim, theta, factor, low, high, original):
    """Llama 3.1's apply_scaling, one frequency at a time, in Python floats."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            out.append(f)
        elif wavelength > original / low:
            out.append(f / factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_rope_scaling_matches_a_slow_per_frequency_loop(preset):
    args = PRESETS[preset]
    scaling = args.rope_scaling
    expected = slow_llama3_frequencies(
        args.head_dim,
        args.rope_theta,
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )
    got = rope_frequencies(args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0)
    # all three bands are present at Llama 3.1's settings: kept, divided by the factor, blended
    base = slow_llama3_frequencies(args.head_dim, args.rope_theta, 1.0, 1.0, 4.0, 8192)
    ratio = expected / base
    assert (ratio == 1).any() and (ratio == 1 / scaling["factor"]).any()
    assert ((ratio > 1 / scaling["factor"]) & (ratio < 1)).any()


def test_plain_rope_without_scaling_is_theta_to_the_minus_2i_over_d():
    args = tiny_args(rope_scaling=None)
    expected = torch.tensor([args.rope_theta ** (-i / args.head_dim) for i in range(0, args.head_dim, 2)])
    torch.testing.assert_close(rope_frequencies(args), expected)


def test_rope_attention_scores_depend_only_on_relative_position():
    args = tiny_args()
    freqs = rope_frequencies(args)
    q, k = torch.randn(args.head_dim), torch.randn(args.head_dim)
    from qadapter_min.model import apply_rope

    def score(m, n):
        cos, sin = rope_cos_sin(freqs, torch.tensor([m, n]))
        rq = apply_rope(q.view(1, 1, 1, -1).expand(1, 1, 2, -1), cos, sin)[0, 0, 0]
        rk = apply_rope(k.view(1, 1, 1, -1).expand(1, 1, 2, -1), cos, sin)[0, 0, 1]
        return rq @ rk

    assert score(7, 3).item() == pytest.approx(score(40, 36).item(), rel=1e-4)


def naive_gqa_attention(attention: Attention, x, cos, sin):
    """Repeat each K/V head for its group of query heads, then masked softmax(q k^T / sqrt(d)) v."""
    from qadapter_min.model import apply_rope

    B, T, _ = x.shape
    H, KV, D = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = (x @ attention.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ attention.k_proj.weight.T).view(B, T, KV, D).transpose(1, 2)
    v = (x @ attention.v_proj.weight.T).view(B, T, KV, D).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // KV, dim=1)  # query head h reads key/value head h // (H / KV)
    v = v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, H * D)
    return y @ attention.o_proj.weight.T


def test_gqa_attention_matches_naive_repeat_kv_masked_softmax():
    torch.manual_seed(0)
    args = tiny_args(num_attention_heads=8, num_key_value_heads=2, head_dim=12)
    attention = Attention(args, layer_index=0)
    x = torch.randn(3, 17, args.hidden_size)
    cos, sin = rope_cos_sin(rope_frequencies(args), torch.arange(17))
    torch.testing.assert_close(
        attention(x, cos, sin), naive_gqa_attention(attention, x, cos, sin), atol=1e-5, rtol=1e-5
    )


def random_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cached_decoding_equals_one_full_forward(tied):
    model = random_model(tie_word_embeddings=tied)
    tokens = torch.randint(0, model.args.vocab_size, (2, 50))  # longer than the scaling's original context (32)
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, batch_size=2, max_seq_len=64, dtype=torch.float32, device="cpu")
        steps = [model(tokens[:, :20], kv_cache=cache)]  # prefill
        steps.append(model(tokens[:, 20:23], kv_cache=cache))  # a chunk after a cached prefix
        steps += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(23, 50)]  # one token at a time
    assert cache.length == 50
    # float32 rounding of logits up to ~7.5, summed in another order: a few ulps (1.1e-5 on AMD EPYC)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=3e-5, rtol=1e-5)


def test_hidden_states_through_the_head_equal_the_logits():
    model = random_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        assert hidden.shape == (2, 9, model.args.hidden_size)
        torch.testing.assert_close(model.logits_from_hidden(hidden[:, 3:5]), model(tokens)[:, 3:5])


def test_tied_model_uses_the_embedding_matrix_as_its_head():
    model = random_model(tie_word_embeddings=True)
    assert model.lm_head is None
    hidden = torch.randn(4, model.args.hidden_size)
    torch.testing.assert_close(model.logits_from_hidden(hidden), hidden @ model.embed_tokens.weight.T)


def test_rmsnorm_is_computed_in_fp32_then_scaled_in_the_input_dtype():
    model = random_model()
    norm = model.norm.to(torch.bfloat16)
    x = torch.randn(3, model.args.hidden_size, dtype=torch.bfloat16) * 30
    x32 = x.float()
    expected = norm.weight * (x32 / torch.sqrt((x32**2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=1e-2)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = random_model().train()
    for p in model.parameters():
        p.requires_grad_(True)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))

    def loss_and_grads(checkpointing):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        loss = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "preset, published",
    [  # parameter counts of the released checkpoints
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.1-70b", 70_553_706_496),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
    ],
)
def test_presets_have_the_published_parameter_counts(preset, published):
    with torch.device("meta"):
        model = Transformer(PRESETS[preset])
    assert model.num_parameters() == published


def test_an_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs(rope_scaling={"rope_type": "yarn", "factor": 4.0})
