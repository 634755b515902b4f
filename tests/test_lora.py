"""LoRA: the adapter on and off, and saving in PEFT's layout."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import random_hf_state, tiny_args, write_checkpoint
from qadapter_min import UserError
from qadapter_min.adapters import save_adapter
from qadapter_min.lora import LoRALinear, adapter_disabled, add_lora, lora_layers
from qadapter_min.policy import load_adapter
from qadapter_min.weights import load_model


@pytest.fixture
def model_dir(tmp_path):
    args = tiny_args()
    return write_checkpoint(tmp_path / "model", args, random_hf_state(args))


def randomise_adapter(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))


def tokens(model, T=12):
    return torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


def test_a_zero_initialised_adapter_leaves_the_model_exactly_as_it_was(model_dir):
    model = load_model(model_dir)
    x = tokens(model)
    with torch.no_grad():
        before = model(x)
        add_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        assert torch.equal(model(x), before)


def test_adapter_disabled_is_exactly_the_base_model_with_a_trained_adapter(model_dir):
    base = load_model(model_dir)
    model = add_lora(load_model(model_dir), r=4, alpha=8)
    randomise_adapter(model)
    x = tokens(model)
    with torch.no_grad():
        with adapter_disabled(model):
            assert torch.equal(model(x), base(x))
        assert not torch.allclose(model(x), base(x))  # the adapter is back afterwards
    with pytest.raises(RuntimeError):
        with adapter_disabled(model):
            raise RuntimeError("inside")
    assert not any(layer.disabled for layer in lora_layers(model).values())


def test_lora_linear_computes_w_x_plus_alpha_over_r_b_a_x():
    base = torch.nn.Linear(6, 5, bias=False)
    layer = LoRALinear(base, r=2, alpha=3.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    W, A, B = base.weight, layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ W.T + (3.0 / 2) * x @ A.T @ B.T)


def test_only_lora_parameters_train_and_base_weights_keep_their_keys(model_dir):
    model = add_lora(load_model(model_dir), r=4, alpha=8, targets=("q_proj", "v_proj"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.self_attn.{proj}.{part}.weight"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for part in ("lora_A", "lora_B")
    }
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if p.requires_grad)


def test_a_bf16_model_with_an_fp32_adapter_computes_in_bf16(model_dir):
    model = add_lora(load_model(model_dir, dtype=torch.bfloat16), r=4, alpha=8)
    randomise_adapter(model)
    assert model(tokens(model)).dtype == torch.bfloat16


def test_save_and_load_round_trip_in_peft_layout(model_dir, tmp_path):
    model = add_lora(load_model(model_dir), r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "gate_proj"))
    randomise_adapter(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["gate_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").shape == (4, 64)
        assert f.get_tensor("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight").shape == (96, 4)
    assert len(names) == 2 * 2 * 3

    fresh = load_model(model_dir)
    load_adapter(fresh, tmp_path / "adapter")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tokens(model)), model(tokens(model)))


def test_an_unknown_lora_target_is_refused(model_dir):
    with pytest.raises(UserError, match="'qkv_proj' is not a projection"):
        add_lora(load_model(model_dir), targets=("qkv_proj",))


def test_an_adapter_for_another_model_is_refused(model_dir, tmp_path):
    other_args = tiny_args(hidden_size=32, intermediate_size=48)
    other = add_lora(
        load_model(write_checkpoint(tmp_path / "other", other_args, random_hf_state(other_args))), r=4, alpha=8
    )
    save_adapter(other, tmp_path / "adapter")
    with pytest.raises(UserError, match="the adapter was made for another model"):
        load_adapter(load_model(model_dir), tmp_path / "adapter")


def test_a_directory_without_an_adapter_is_named(model_dir, tmp_path):
    with pytest.raises(UserError, match=r"adapter_config\.json does not exist"):
        load_adapter(load_model(model_dir), tmp_path)


def test_keyed_dropout_drops_at_its_rate_and_a_rows_mask_depends_on_its_key_and_position_only():
    from qadapter_min.lora import keyed_dropout

    x = torch.ones(3, 40, 500)
    keys = torch.tensor([11, 12, 13])
    y = keyed_dropout(x, keys, layer_index=2, p=0.2)
    assert abs((y == 0).float().mean().item() - 0.2) < 0.01 and torch.allclose(y[y != 0], torch.tensor(1 / 0.8))
    shorter = keyed_dropout(torch.ones(2, 25, 500), keys[[2, 0]], layer_index=2, p=0.2)  # other rows, less padding
    assert torch.equal(shorter, y[[2, 0], :25])
    other_layer = keyed_dropout(x, keys, layer_index=3, p=0.2)
    assert 0.6 < (other_layer == y).float().mean().item() < 0.7  # independent masks agree on 0.8^2 + 0.2^2 = 0.68
