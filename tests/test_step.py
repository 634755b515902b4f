"""One micro-batch through the model (step.py): the loss of the plain objective on full logits, and the
implicit rewards R(y) of each policy against the obvious computation from full logits."""

from contextlib import nullcontext

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model_dir, write_pairs
from qadapter_min.adapters import save_adapter, save_run_config
from qadapter_min.data import collate, encode_pairs, load_pairs
from qadapter_min.lora import adapter_disabled, add_lora, lora_layers
from qadapter_min.objective import Objective, loss_from_logits, policy_logits
from qadapter_min.policy import BASE, Policy, log_probs, policy_applied, preference_metrics, read_policy
from qadapter_min.step import micro_batch_objective
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model

ALPHA, ALPHA0 = 0.8, 0.2


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tokenizer_file):
    """A tiny model with a trained-looking adapter (B != 0), and 6 encoded pairs."""
    directory = tmp_path_factory.mktemp("step")
    model_dir = tiny_model_dir(directory / "model", tokenizer_file)
    tokenizer = Tokenizer(model_dir)
    pairs = encode_pairs(
        load_pairs(write_pairs(directory / "pairs.jsonl", n=6), log=lambda *_: None),
        tokenizer,
        512,
        log=lambda *_: None,
    )
    model = add_lora(load_model(model_dir), r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.3)
    return model.eval(), pairs, tokenizer.eot_id


def slow_rewards(model, tokens, response_mask, policy_mode, alpha=ALPHA, alpha0=ALPHA0):
    """R(y) = sum over reply tokens of alpha log pi(a_t|s_t) - alpha0 log pi1(a_t|s_t), from full logits."""
    with torch.no_grad():
        with adapter_disabled(model):
            base = model(tokens)
        adapter = model(tokens)
    log_pi1 = base.log_softmax(-1)
    log_pi = {
        "base": log_pi1,
        "adapter": adapter.log_softmax(-1),
        "customised": policy_logits(adapter, base, alpha, alpha0).log_softmax(-1),
    }[policy_mode]
    rewards = torch.zeros(tokens.shape[0])
    for row in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if response_mask[row, t]:  # token t is the action taken in the state after tokens[:t]
                a = tokens[row, t]
                rewards[row] += alpha * log_pi[row, t - 1, a] - alpha0 * log_pi1[row, t - 1, a]
    return rewards


@pytest.mark.parametrize("policy_mode", ["base", "adapter", "customised"])
def test_the_rewards_of_each_policy_match_full_logits_and_give_the_reports_accuracy(batch, policy_mode):
    model, pairs, pad_id = batch
    tokens, response_mask = collate(pairs, pad_id)
    settings = Objective("qadapter" if policy_mode == "customised" else "dpo", alpha=ALPHA, alpha0=ALPHA0)
    with torch.no_grad(), adapter_disabled(model) if policy_mode == "base" else nullcontext():
        _, metrics = micro_batch_objective(model, tokens, response_mask, settings)
    # pi~'s R at its own alpha and alpha0; a plain model's (base, DPO's adapter on) its log-likelihood
    temperatures = (ALPHA, ALPHA0) if policy_mode == "customised" else (1.0, 0.0)
    expected = slow_rewards(model, tokens, response_mask, policy_mode, *temperatures)
    torch.testing.assert_close(metrics["rewards"], expected, rtol=1e-5, atol=1e-5)

    policy = Policy(policy_mode, policy_mode, alpha=ALPHA, alpha0=ALPHA0)
    measured = preference_metrics(model, policy, pairs, pad_id, micro_batch_size=4)  # 6 pairs: micro-batches of 4 and 2
    assert measured["preference_accuracy"] == pytest.approx((expected[:6] > expected[6:]).float().mean().item())
    assert measured["preference_margin"] == pytest.approx((expected[:6] - expected[6:]).mean().item(), rel=1e-5)


@pytest.mark.parametrize("objective", ["qadapter", "dpo", "sft"])
def test_the_micro_batch_loss_and_gradients_are_the_plain_objectives_on_full_logits(batch, objective):
    model, pairs, pad_id = batch
    tokens, response_mask = collate(pairs[:3], pad_id)
    settings = Objective(objective, alpha=ALPHA, alpha0=ALPHA0, beta=0.3, gamma=0.9, dpo_beta=0.2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss, _ = micro_batch_objective(model, tokens, response_mask, settings)
    grads = torch.autograd.grad(loss, trainable)
    with torch.no_grad(), adapter_disabled(model):
        base = model(tokens)
    # SFT: the rows are conversations of their own, without the base model; the chosen and rejected ones serve
    # as six of them
    plain, _ = loss_from_logits(model(tokens), base if objective != "sft" else None, tokens, response_mask, settings)
    plain_grads = torch.autograd.grad(plain, trainable)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy_mode", ["base", "adapter", "customised"])
def test_log_probs_of_each_policy_are_those_of_full_logits(batch, policy_mode):
    model, _, _ = batch

    def slow_log_pi(sequence):  # (len, V): log pi(. | the first i + 1 tokens)
        tokens = torch.tensor([sequence])
        with torch.no_grad():
            with adapter_disabled(model):
                base = model(tokens)[0]
            adapter = model(tokens)[0]
        logits = {"base": base, "adapter": adapter, "customised": policy_logits(adapter, base, ALPHA, ALPHA0)}[
            policy_mode
        ]
        return logits.log_softmax(-1)

    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 101, (n,), generator=generator).tolist() for n in (7, 31, 12, 31, 2, 20)]
    num_scored = [3, 10, 1, 30, 1, 5]
    for i in (2, 4):  # one scored token each, made the policy's greedy choice
        sequences[i][-1] = int(slow_log_pi(sequences[i])[-2].argmax())
    sequences += [sequences[2][:-1] + [5], sequences[1][:-1] + [9]]  # options that differ in their last token only
    num_scored += [1, 10]
    policy = Policy(policy_mode, policy_mode, alpha=ALPHA, alpha0=ALPHA0)
    got = log_probs(
        model, policy, sequences, num_scored, batch_size=4, chunk_size=7
    )  # batches of 4 and 2, chunks split rows
    for sequence, n, (log_prob, greedy) in zip(sequences, num_scored, got):
        log_pi = slow_log_pi(sequence)[len(sequence) - n - 1 : -1]
        targets = torch.tensor(sequence[len(sequence) - n :])
        assert log_prob == pytest.approx(log_pi.gather(1, targets[:, None]).sum().item(), abs=1e-5, rel=1e-5)
        assert greedy == bool((log_pi.argmax(1) == targets).all())
    assert [greedy for _, greedy in got] == [False, False, True, False, True, False, False, False]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer_file):
    """A base model, 5 encoded pairs, and a DPO and a Q-Adapter adapter on disk (B != 0)."""
    directory = tmp_path_factory.mktemp("implicit")
    model_dir = tiny_model_dir(directory / "model", tokenizer_file)
    tokenizer = Tokenizer(model_dir)
    quiet = lambda *_: None  # noqa: E731
    pairs = encode_pairs(load_pairs(write_pairs(directory / "pairs.jsonl", n=5), log=quiet), tokenizer, 512, log=quiet)
    for seed, objective in enumerate(["dpo", "qadapter"]):
        model = add_lora(load_model(model_dir), r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(0.0, 0.3)
        save_adapter(model, directory / objective)
        flags = {"objective": objective, "alpha0": 0.3, "model": str(model_dir)}
        save_run_config(directory / objective, model, flags, steps=1, epochs=1.0)
    return model_dir, pairs, tokenizer.pad_id, directory


def slow_implicit_rewards(model_dir, adapter, mode, alpha0, scale, pairs) -> torch.Tensor:
    """z(y) = sum over the reply of log pi(a_t|s_t) - log pi1(a_t|s_t) per reply (chosen ones, then
    rejected), each reply through two full forward passes alone: the base model's, and a model whose
    weights are W + scale (alpha/r) B A, merged by hand."""
    base, merged = load_model(model_dir), load_model(model_dir)
    if adapter is not None:
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            for name in f.keys():
                if name.endswith("lora_A.weight"):
                    module = name.removeprefix("base_model.model.model.").removesuffix(".lora_A.weight")
                    B = f.get_tensor(name.replace("lora_A", "lora_B"))
                    weight = merged.get_submodule(module).weight
                    weight.data += scale * (8 / 4) * B @ f.get_tensor(name)
    rewards = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            ids, prompt_len = getattr(pair, side), getattr(pair, f"{side}_prompt_len")
            tokens = torch.tensor([ids])
            with torch.no_grad():
                log_pi1 = base(tokens)[0].log_softmax(-1)
                logits = merged(tokens)[0]
            log_pi = {
                "base": log_pi1,
                "adapter": logits.log_softmax(-1),
                "customised": policy_logits(logits, base(tokens)[0], 1.0, alpha0).log_softmax(-1),
            }[mode]
            rewards.append(sum(log_pi[t - 1, ids[t]] - log_pi1[t - 1, ids[t]] for t in range(prompt_len, len(ids))))
    return torch.stack(rewards) if adapter is not None else torch.zeros(2 * len(pairs))


@pytest.mark.parametrize(
    "objective, alpha0, scale",
    [
        (None, None, 1.0),
        ("dpo", None, 1.0),
        ("dpo", None, 0.5),
        ("qadapter", 0.3, 1.0),
        ("qadapter", 1.0, 1.0),
        ("qadapter", 0.3, 0.5),
    ],
)
def test_implicit_reward_accuracy_and_margin_equal_two_full_forward_passes_per_reply(
    adapters, objective, alpha0, scale
):
    """evaluate.py's implicit_reward_accuracy and _margin of the base model (0.5 and 0 exactly), a DPO
    adapter and a Q-Adapter adapter at two alpha0 and at scale 0.5, against log-softmaxes summed by hand."""
    model_dir, pairs, pad_id, directory = adapters
    adapter = None if objective is None else directory / objective
    policy = BASE if adapter is None else read_policy(str(adapter), alpha0, scale)
    model = load_model(model_dir)
    with policy_applied(model, policy):
        measured = preference_metrics(model, policy, pairs, pad_id, micro_batch_size=2)
    z = slow_implicit_rewards(model_dir, adapter, policy.mode, policy.alpha0, scale, pairs)
    chosen, rejected = z.chunk(2)
    if adapter is None:
        assert measured["implicit_reward_accuracy"] == 0.5
        assert measured["implicit_reward_margin"] == 0.0
        return
    assert (chosen - rejected).abs().min() > 1e-3  # no near tie that rounding could turn
    assert measured["implicit_reward_accuracy"] == (chosen > rejected).sum().item() / len(pairs)
    assert measured["implicit_reward_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-4, abs=1e-5)
