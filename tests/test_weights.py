"""Loading Hugging Face checkpoints: parity with transformers, round trips, and one-sentence errors."""

import fnmatch
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, random_hf_state, tiny_args, write_checkpoint
from qadapter_min import UserError
from qadapter_min.weights import load_model


@pytest.mark.parametrize("fixture", ["tiny-llama-untied-sharded", "tiny-llama-tied"])
def test_logits_match_transformers_golden_logits(fixture):
    """tests/fixtures/* were written by transformers' LlamaForCausalLM (tools/make_golden.py): llama3
    RoPE scaling, GQA, sequences past the scaling's original context, both config.json forms."""
    golden = load_file(FIXTURES / fixture / "golden.safetensors")
    model = load_model(FIXTURES / fixture, dtype=torch.float32)
    with torch.no_grad():
        logits = model(golden["input_ids"])
    assert (logits - golden["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("rope_form", ["classic", "parameters"])
def test_every_tensor_arrives_where_the_checkpoint_name_says(tmp_path, tied, shards, rope_form):
    args = tiny_args(tie_word_embeddings=tied)
    state = random_hf_state(args)
    write_checkpoint(tmp_path, args, state, shards=shards, rope_form=rope_form)
    model = load_model(tmp_path)
    assert model.args == args
    ours = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(ours[name.removeprefix("model.")], tensor), name
    assert set(ours) == {name.removeprefix("model.") for name in state}
    if tied:
        assert model.lm_head is None and "lm_head.weight" not in state


def test_loaded_model_is_frozen_in_eval_mode_in_the_requested_dtype(tmp_path):
    args = tiny_args()
    state = random_hf_state(args)
    write_checkpoint(tmp_path, args, state)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"].bfloat16())


def test_a_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    args = tiny_args(tie_word_embeddings=True)
    state = random_hf_state(args)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, args, state)
    assert load_model(tmp_path).lm_head is None


def checkpoint(tmp_path, shards=1, **overrides):
    args = tiny_args(**overrides)
    return write_checkpoint(tmp_path / "model", args, random_hf_state(args), shards=shards), args


def test_a_missing_shard_is_named(tmp_path):
    model_dir, _ = checkpoint(tmp_path, shards=3)
    (model_dir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        UserError, match=r"model-00002-of-00003\.safetensors is listed in .*index\.json but does not exist"
    ):
        load_model(model_dir)


def test_a_wrong_shape_names_the_file_and_the_tensor(tmp_path):
    model_dir, args = checkpoint(tmp_path)
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(5, args.hidden_size)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(
        UserError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.k_proj\.weight has shape \(5, 64\)"
    ):
        load_model(model_dir)


def test_a_missing_tensor_is_named(tmp_path):
    model_dir, _ = checkpoint(tmp_path)
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.0.post_attention_layernorm.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks the tensor model\.layers\.0\.post_attention_layernorm\.weight"):
        load_model(model_dir)


def test_an_extra_tensor_is_named(tmp_path):
    model_dir, _ = checkpoint(tmp_path)
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(UserError, match=r"holds the tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(model_dir)


def test_an_unknown_rope_type_names_config_json(tmp_path):
    model_dir, _ = checkpoint(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: rope_type 'yarn' is not supported"):
        load_model(model_dir)


def test_a_model_that_is_not_llama_is_refused(tmp_path):
    model_dir, _ = checkpoint(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "mistral"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json describes a 'mistral' model"):
        load_model(model_dir)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    model_dir, _ = checkpoint(tmp_path)
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model\.safetensors is not a readable safetensors file"):
        load_model(model_dir)


def test_a_directory_without_config_or_weights_is_named(tmp_path):
    model_dir, _ = checkpoint(tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        load_model(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json does not exist"):
        load_model(model_dir)


def test_an_index_cannot_point_outside_the_model_directory(tmp_path):
    model_dir, _ = checkpoint(tmp_path, shards=2)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shutil.copy(model_dir / "model-00001-of-00002.safetensors", tmp_path / "elsewhere.safetensors")
    index["weight_map"] = {
        name: ("../elsewhere.safetensors" if "00001" in f else f) for name, f in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside the model directory"):
        load_model(model_dir)


def test_a_path_that_is_neither_a_directory_nor_a_repo_id_is_refused(tmp_path):
    with pytest.raises(UserError, match="neither a directory nor a Hugging Face repo id"):
        load_model(tmp_path / "no-such-model")


def test_a_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        load_model("meta-llama/Llama-3.1-8B-Instruct")


def test_a_hub_download_fetches_config_tokenizer_and_safetensors_only(monkeypatch):
    import huggingface_hub

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(FIXTURES / "tiny-llama-tied")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("someone/tiny-llama")
    assert asked["repo_id"] == "someone/tiny-llama" and model.args.tie_word_embeddings

    def fetched(path):
        return any(fnmatch.fnmatch(path, pattern) for pattern in asked["patterns"])

    for wanted in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "model-00001-of-00004.safetensors",
        "model.safetensors.index.json",
    ]:
        assert fetched(wanted), wanted
    for unwanted in ["original/consolidated.00.pth", "original/params.json", "pytorch_model.bin"]:
        assert not fetched(unwanted), unwanted
