"""The tokenizer (a `tokenizers` BPE read from tokenizer.json) and the two chat formats it may speak,
found from its special tokens.

Llama-3.1-Instruct, as the official template renders a conversation without tools:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    Cutting Knowledge Date: December 2023\\nToday Date: {date}\\n\\n{system}<|eot_id|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>      (each message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                              (generation prompt)

ChatML (SmolLM2, Qwen2), for a tokenizer with <|im_start|> and <|im_end|>; no BOS, contents as they are:

    <|im_start|>system\\n{system}<|im_end|>\\n      (the model's default system message if none is given)
    <|im_start|>{role}\\n{content}<|im_end|>\\n     (each message)
    <|im_start|>assistant\\n                       (generation prompt)

The default system message is the one the model's chat template writes (tokenizer_config.json beside
tokenizer.json); a template without one gets no system turn unless the conversation has one.

A template renders one string and the tokenizer splits it at the special tokens before BPE, so each
stretch of text between two special tokens is encoded on its own. `encode_chat` builds exactly those
stretches and puts the special-token ids between them. Unlike the template, the text of a message is
always text: a message that contains the characters "<|eot_id|>" is encoded as those characters,
never as the control token.
"""

import json
import os
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from qadapter_min import UserError

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
END_OF_MESSAGE = "<|eom_id|>"  # ends a tool call in ipython mode
IM_START, IM_END, CHATML_END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_ROLES = ("system", "user", "assistant")
LLAMA_3_1, CHATML = "llama-3.1-instruct", "chatml"  # the chat formats


class Tokenizer:
    """encode / decode text and encode chats, over a tokenizer.json of Llama 3 or of a ChatML model."""

    def __init__(self, path: str | os.PathLike):
        """path: a model directory holding tokenizer.json, or the tokenizer.json file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(
                f"{file} does not exist; pass a model directory that holds tokenizer.json, or the file itself"
            )
        try:
            self._tokenizer = HFTokenizer.from_file(str(file))
        except Exception as error:  # the Rust side raises a bare Exception for every parse error
            raise UserError(f"{file} is not a tokenizer.json the tokenizers library can read ({error})") from None
        # Special tokens are found by their spelling only where we put them (by id); text never produces them.
        self._tokenizer.encode_special_tokens = True
        self.special_ids = {
            token.content: token_id
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
            if token.special
        }
        if all(name in self.special_ids for name in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN)):
            self.chat_format = LLAMA_3_1
            self.bos_id = self.special_ids[BEGIN_OF_TEXT]
            self.eot_id = self.special_ids[END_OF_TURN]  # closes every turn, so every reply
            # the end of a turn, of a tool message, of the text
            stops = (END_OF_TURN, END_OF_MESSAGE, END_OF_TEXT)
            self.default_system = None
            self.declared_bos_id = self.bos_id
        elif IM_START in self.special_ids and IM_END in self.special_ids:
            self.chat_format = CHATML
            self.bos_id = None  # ChatML models start with the first turn
            self.eot_id = self.special_ids[IM_END]
            stops = (IM_END, CHATML_END_OF_TEXT)
            config = read_tokenizer_config(file.parent / "tokenizer_config.json")
            self.default_system = default_system_message(config)
            # the BOS the tokenizer declares though no template writes it (SmolLM2: <|im_start|>): lm-eval's
            # Hugging Face backend puts it before an empty context
            self.declared_bos_id = (
                self.special_ids.get(config.get("bos_token")) if isinstance(config.get("bos_token"), str) else None
            )
        else:
            raise UserError(
                f"{file} has neither Llama 3's special tokens ({START_HEADER}, {END_OF_TURN}, ...) nor ChatML's "
                f"({IM_START}, {IM_END}); qadapter-min speaks those two chat formats"
            )
        self.stop_ids = [self.special_ids[t] for t in stops if t in self.special_ids]

    @property
    def pad_id(self) -> int:
        """What pads a batch's rows: Llama 3's <|finetune_right_pad_id|> where the tokenizer has it,
        else the end of turn (padding is masked out either way; a token of its own reads better)."""
        return self.special_ids.get("<|finetune_right_pad_id|>", self.eot_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def special_token_id(self, name: str) -> int:
        """The id of a special token, looked up by its spelling (e.g. "<|eot_id|>")."""
        if name not in self.special_ids:
            raise KeyError(f"the tokenizer has no special token {name}")
        return self.special_ids[name]

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS added, special-token spellings kept as text."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids; special tokens are written out by their spelling, or left out."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a string in which special-token spellings stand for the tokens, as a chat template
        renders them: what Hugging Face's tokenizer gives for such a string, without adding a BOS."""
        self._tokenizer.encode_special_tokens = False
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = True

    def _turn(self, role: str, text: str) -> list[int]:
        """A turn's opening and text, without what closes it (module docstring)."""
        if self.chat_format == CHATML:
            return [self.special_ids[IM_START], *self.encode(f"{role}\n{text}")]
        return [
            self.special_ids[START_HEADER],
            *self.encode(role),
            self.special_ids[END_HEADER],
            *self.encode("\n\n" + text),
        ]

    def _end_of_turn(self) -> list[int]:
        return [self.eot_id, *self.encode("\n")] if self.chat_format == CHATML else [self.eot_id]

    def _turns(self, messages: list[dict], date_string: str) -> list[tuple[str, str]]:
        if self.chat_format == CHATML:
            return chatml_turns(messages, self.default_system)
        return chat_turns(messages, date_string)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, date_string: str = "26 Jul 2024"
    ) -> list[int]:
        """Token ids of a conversation in the tokenizer's chat format (module docstring).

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]; a leading system
        message goes into the system block (Llama 3.1: there even without one, contents stripped).
        add_generation_prompt: end with the assistant header, ready for the model's reply.
        date_string: Llama 3.1's system block only.
        """
        ids = [] if self.bos_id is None else [self.bos_id]
        for role, text in self._turns(messages, date_string):
            ids += [*self._turn(role, text), *self._end_of_turn()]
        if add_generation_prompt:
            ids += self._turn("assistant", "")
        return ids

    def chat_text(
        self, messages: list[dict], add_generation_prompt: bool = True, date_string: str = "26 Jul 2024"
    ) -> str:
        """The conversation rendered as the chat template renders it, one string with the special tokens spelt
        out; `encode_rendered` of it gives encode_chat's ids (unless a message spells a special token).
        Without the generation prompt the last message is left open (no end of turn), for the model to continue."""
        end = f"{IM_END}\n" if self.chat_format == CHATML else END_OF_TURN
        bos = "" if self.bos_id is None else BEGIN_OF_TEXT
        text = bos + "".join(self._turn_text(role, text) + end for role, text in self._turns(messages, date_string))
        if add_generation_prompt:
            return text + self._turn_text("assistant", "")
        return text.removesuffix(end)

    def _turn_text(self, role: str, text: str) -> str:
        """_turn spelt out as the template writes it."""
        if self.chat_format == CHATML:
            return f"{IM_START}{role}\n{text}"
        return f"{START_HEADER}{role}{END_HEADER}\n\n{text}"


def check_messages(messages: list[dict]):
    for message in messages:
        if message.get("role") not in CHAT_ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"a chat message needs a role in {CHAT_ROLES} and string content, got {message!r}")


def chat_turns(messages: list[dict], date_string: str) -> list[tuple[str, str]]:
    """(role, text) of each turn of the chat format: the system block first (there even without a system
    message), then every message, contents stripped."""
    messages = list(messages)
    check_messages(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"].strip()
    system_text = f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}"
    return [("system", system_text)] + [(m["role"], m["content"].strip()) for m in messages]


def chatml_turns(messages: list[dict], default_system: str | None) -> list[tuple[str, str]]:
    """(role, text) of each turn of ChatML: the default system message first when the conversation has no
    system message (and the template has one), then every message as it is. Unlike the template, an empty
    conversation gets the default system turn too, so that a prompt's ids always begin its conversation's."""
    check_messages(messages)
    system = (
        [("system", default_system)]
        if default_system is not None and (not messages or messages[0]["role"] != "system")
        else []
    )
    return system + [(m["role"], m["content"]) for m in messages]


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json's fields, or {} where there is no readable one (it is optional)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def default_system_message(config: dict) -> str | None:
    """The system message a ChatML chat template writes when a conversation has none: the text it puts
    between "<|im_start|>system\\n" and "<|im_end|>" as a literal (SmolLM2's "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face"). None without a template or such a text."""
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if not isinstance(template, str):
        return None
    match = re.search(r"<\|im_start\|>system\n([^'\"{}]*?)<\|im_end\|>", template)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------------------
# Small tokenizers of the same kind, for the built-in world and the tests: Llama 3's pre-tokenizer
# (the split pattern of its tokenizer.json), byte-level BPE and its 256 special tokens, over a tiny
# vocabulary trained on the texts at hand.
