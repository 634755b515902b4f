"""A reward model, trained here (train.py --objective rm): the base model with LoRA and a new score head,
Bradley-Terry on preference pairs, written as a complete checkpoint in Hugging Face's
LlamaForSequenceClassification layout (the model.* tensors of a Llama and score.weight, one row), the layout
in which Skywork-Reward-Llama-3.1-8B and others are published. judge.py reads such a checkpoint.

The reward of a conversation is score.weight @ h, h the final normed hidden state at its last token.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from qadapter_min import UserError
from qadapter_min.common import full, write_json
from qadapter_min.data import EncodedPair, encode_pairs
from qadapter_min.lora import lora_layers
from qadapter_min.model import Transformer
from qadapter_min.weights import CONFIG_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, 5GB


def add_score_head(model: Transformer, device=None) -> Transformer:
    """The new head a reward model is trained with (train.py --objective rm): one row, in fp32 like
    LoRA, at zero, so that every reward starts at 0 and the loss at ln 2."""
    model.score = torch.nn.Linear(model.args.hidden_size, 1, bias=False, device=device)
    torch.nn.init.zeros_(model.score.weight)
    return model


def save_reward_model(model: Transformer, model_dir: Path, out: Path, pad_id: int, master: bool):
    """The trained reward model as a complete checkpoint in out, in the LlamaForSequenceClassification
    layout: the base weights in model_dir with the LoRA merged (merge.py), the LM head of an untied
    base left out, score.weight, config.json with that architecture, one label and the pad token id
    (transformers finds each padded row's last token by it), and the tokenizer files. Every rank
    calls it (under --fsdp the tensors are gathered); rank 0 writes, the files appearing together."""
    lora = {
        name: (full(layer.lora_A.weight).detach().float().cpu(), full(layer.lora_B.weight).detach().float().cpu())
        for name, layer in lora_layers(model).items()
    }
    score = full(model.score.weight).detach().float().cpu()
    if not master:
        return
    scale = next(iter(lora_layers(model).values())).scale  # alpha / r
    partial = out / "reward_model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    from qadapter_min.merge import write_merged_checkpoint  # a reward model's run alone merges

    write_merged_checkpoint(
        model_dir,
        partial,
        lora,
        scale,
        MAX_SHARD_BYTES,
        added={"score.weight": score},
        leave_out=("lm_head.weight",),
        what="reward model",
    )
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    config.update(
        architectures=["LlamaForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad_id,
    )
    write_json(partial / CONFIG_FILE, config)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, partial / name)
    for path in sorted(partial.iterdir(), key=lambda p: p.name == CONFIG_FILE):  # config.json last
        os.replace(path, out / path.name)
    partial.rmdir()


def reward_model_pairs(pairs, tokenizer, max_len: int, log=print) -> list:
    """Pairs encoded for a reward model: each conversation as the chat template renders it, to its
    very end (ChatML writes a newline after the reply's <|im_end|>), since a reward model reads the
    last token of a rendered conversation, as evaluate.py and transformers read it; at most max_len
    tokens. The tokenizer's padding token must differ from that last token: transformers finds a
    padded row's last token as the last one that is not padding."""
    rendered = tokenizer.encode_chat([{"role": "user", "content": "?"}])
    end = rendered[len(rendered) - rendered[::-1].index(tokenizer.eot_id) :]  # after the turn
    if tokenizer.pad_id == (end or [tokenizer.eot_id])[-1]:
        raise UserError(
            f"the tokenizer pads with the token that ends every conversation (id {tokenizer.pad_id}), "
            f"so a reward model's padded rows could not be read; use a tokenizer with a padding token "
            f"of its own, such as Llama 3's <|finetune_right_pad_id|>"
        )
    if end:
        log(f"a reward model reads each conversation to its end, {len(end)} token(s) past the reply")
    encoded = encode_pairs(pairs, tokenizer, max_len - len(end), log=log)
    return [EncodedPair(p.chosen + end, p.chosen_prompt_len, p.rejected + end, p.rejected_prompt_len) for p in encoded]


def reward_model_loss(rewards: torch.Tensor):
    """A reward model's Bradley-Terry loss, as the paper's authors train theirs: the mean over pairs
    of -log sigmoid(r(y_w) - r(y_l)), rewards (2B,) the chosen replies' then the rejected ones'.
    (loss, metrics): objective.REWARD_MODEL_METRICS, reward_accuracy the share of pairs with
    r(y_w) > r(y_l) and reward_margin the mean r(y_w) - r(y_l)."""
    chosen, rejected = rewards.chunk(2)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    accuracy = ((chosen > rejected) + 0.5 * (chosen == rejected)).mean()  # a tie counts half
    return loss, {"reward_accuracy": accuracy, "reward_margin": (chosen - rejected).mean()}
