"""Preference pairs from the files people have, encoded in the chat format and batched.

A pair is one prompt (a conversation ending with a user turn) and two assistant replies. These file
formats are read, as a JSON array or JSON Lines, optionally gzipped:
    1. conversational (TRL, the Q-Adapter authors' *.json):
           {"chosen": [{"role", "content"}, ...], "rejected": [...]}   prompt = all but the last message
    2. TRL's explicit prompt, conversational or plain text (a user message and assistant replies):
           {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
           {"prompt": "text", "chosen": "text", "rejected": "text"}
    3. Anthropic HH-RLHF as published:
           {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
    4. DSP: {"query": str, "responses": {"academy", "business", "entertainment", "literature", "normal"}}
           for a domain D, four pairs: the D response preferred over each of the other four.

Records that cannot be used (an empty reply, a last message not from the assistant, an unknown role,
content that is not a string) are skipped and counted; a file that cannot be read at all is refused
with its name and line number.
"""

import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from qadapter_min import UserError
from qadapter_min.tokenizer import Tokenizer

DSP_DOMAINS = ("academy", "business", "entertainment", "literature")
DSP_RESPONSES = DSP_DOMAINS + ("normal",)
ROLES = ("system", "user", "assistant")
# What sample.py --prompts adds to each record it replies to (read back by train.py --objective sft)
REPLY_KEYS = ("reply", "finish_reason", "base_reply", "base_finish_reason", "sampled_with")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Pair:
    """One preference pair as two full conversations that share a prompt; the reply is the last message."""

    chosen: list[dict]
    rejected: list[dict]
    source: str  # "file:line", for messages about this record


class Skip(Exception):
    """A record that cannot be used; the message is the reason it is counted under."""


# ------------------------------------------------------------------------------------------------
# Reading files


def check_data_file(path: Path):
    """Refuse a data path that is not a file, before anything is read."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {what}; pass a preference data file (JSON or JSON Lines, optionally .gz)")


def read_records(path: Path):
    """(line number, record) for each record of a JSON array or JSON Lines file, gzipped or not."""
    check_data_file(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} cannot be read as UTF-8 text ({error}); check the file is complete and not compressed twice"
        ) from None
    if text.lstrip().startswith("["):  # one JSON array
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}: malformed JSON at line {error.lineno} ({error.msg}); fix that line or re-export the file"
            ) from None
        # an array has no line per record: number its records from 1 instead
        return [(f"record {i}", record) for i, record in enumerate(records, start=1)]
    if text.lstrip().startswith("{") and "\n" in text.strip():  # perhaps one pretty-printed record
        try:
            return [("record 1", json.loads(text))]
        except json.JSONDecodeError:
            pass  # JSON Lines: read line by line below
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {line_number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}: malformed JSON at line {line_number} ({error.msg}); fix that line or re-export the file"
            ) from None
    return records


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's "\\ud83d" without its pair), which no
    tokenizer takes and no UTF-8 file can hold."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_conversation(messages) -> list[dict]:
    """A conversation with stripped contents, or Skip with the reason it cannot be trained on."""
    if not isinstance(messages, list):
        raise Skip("conversation that is not a list of messages")
    if not messages:
        raise Skip("empty conversation")
    clean = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise Skip("message without role and content")
        if message["role"] not in ROLES:
            raise Skip("unknown role")
        if not isinstance(message["content"], str):
            raise Skip("content that is not a string")
        if not message["content"].isascii() and not is_unicode(message["content"]):
            raise Skip("text that is not valid Unicode (a lone surrogate, as in \\ud83d)")
        clean.append({"role": message["role"], "content": message["content"].strip()})
    if clean[-1]["role"] != "assistant":
        raise Skip("last message not from the assistant")
    if not clean[-1]["content"]:
        raise Skip("empty reply")
    if len(clean) < 2:
        raise Skip("reply without a prompt")
    return clean


def parse_hh(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = HH_TURN.split("\n\n" + text.lstrip())  # ["", "Human", " a", "Assistant", " b", ...]
    if parts[0].strip():
        raise Skip("text before the first Human turn")
    return [{"role": HH_ROLES[speaker], "content": content} for speaker, content in zip(parts[1::2], parts[2::2])]


def record_to_pairs(record, domain: str | None, where: str) -> list[Pair]:
    """The pairs in one record, in any of the known formats; a record in no known format is refused."""
    if isinstance(record, dict) and "chosen" in record and "rejected" in record:
        chosen, rejected = record["chosen"], record["rejected"]
        if "prompt" in record:  # TRL's explicit prompt: the conversation so far, then each reply
            prompt = record["prompt"]
            if all(isinstance(x, str) for x in (prompt, chosen, rejected)):  # its plain-text form
                prompt = [{"role": "user", "content": prompt}]
                chosen, rejected = (
                    [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}],
                )
            if not all(isinstance(x, list) for x in (prompt, chosen, rejected)):
                raise Skip("prompt and replies that are neither all text nor all messages")
            chosen, rejected = prompt + chosen, prompt + rejected
        elif isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF
            chosen, rejected = parse_hh(chosen), parse_hh(rejected)
        return [Pair(check_conversation(chosen), check_conversation(rejected), where)]
    if isinstance(record, dict) and "query" in record and "responses" in record:  # DSP
        if domain is None:
            raise UserError(
                f"{where} is DSP data, which needs a domain: pass --domain with one of {', '.join(DSP_DOMAINS)}"
            )
        if not isinstance(record["query"], str) or not isinstance(record["responses"], dict):
            raise Skip("DSP query or responses of the wrong type")
        prompt = {"role": "user", "content": record["query"]}
        pairs = []
        if not all(isinstance(record["responses"].get(key), str) for key in DSP_RESPONSES):
            raise Skip("DSP record without all five responses")
        for other in DSP_RESPONSES:
            if other != domain:
                chosen = [prompt, {"role": "assistant", "content": record["responses"].get(domain)}]
                rejected = [prompt, {"role": "assistant", "content": record["responses"].get(other)}]
                pairs.append(Pair(check_conversation(chosen), check_conversation(rejected), where))
        return pairs
    raise UserError(
        f"{where} is in no known preference format; expected chosen/rejected (conversations, HH-RLHF text, or "
        f"TRL's with a prompt) or DSP's query/responses"
    )


def record_to_conversations(record, domain: str | None, where: str) -> list[list[dict]]:
    """The conversations to fine-tune on (SFT) in one record: {"messages": [...]} ending with the
    assistant's reply; a line of sample.py --prompts's output, its prompt and its "reply" (Replay's data);
    or the chosen conversation of each pair of a preference record."""
    if isinstance(record, dict) and isinstance(record.get("reply"), str):
        prompt = prompt_of({k: v for k, v in record.items() if k not in REPLY_KEYS})
        if prompt is None:
            raise Skip("reply without a prompt")
        return [check_conversation(prompt + [{"role": "assistant", "content": record["reply"]}])]
    if isinstance(record, dict) and "messages" in record and "chosen" not in record:
        messages = record["messages"]
        if (
            isinstance(messages, list)
            and messages
            and isinstance(messages[-1], dict)
            and messages[-1].get("role") != "assistant"
        ):
            raise UserError(
                f"{where}: its last message is not the assistant's; a record to fine-tune on ends with "
                f"the reply to learn"
            )
        return [check_conversation(messages)]
    return [pair.chosen for pair in record_to_pairs(record, domain, where)]


def load_pairs(paths, domain: str | None = None, log=print) -> list[Pair]:
    """All usable pairs of one file or several; prints, per file, how many were read and why any were
    skipped."""
    return load_items(paths, domain, log, record_to_pairs, "preference pair", "pairs")


def load_conversations(paths, domain: str | None = None, log=print) -> list[list[dict]]:
    """All usable conversations of one file or several to fine-tune on (SFT): {"messages": [...]} records
    and the chosen conversations of preference records; prints how many were read and why any were
    skipped."""
    return load_items(paths, domain, log, record_to_conversations, "conversation ending with a reply", "conversations")


def load_items(paths, domain: str | None, log, items_of_record, one: str, many: str) -> list:
    """items_of_record(record, domain, where) over every record of each file, skipped records counted.
    --domain needs DSP records in one of the files, not in all: Replay's data beside DSP's holds none."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if domain is not None and domain not in DSP_DOMAINS:
        raise UserError(f"--domain {domain!r} is not a DSP domain; choose one of {', '.join(DSP_DOMAINS)}")
    files = [(path, list(read_records(path))) for path in paths]
    if domain is not None and not any(
        isinstance(record, dict) and "query" in record and "responses" in record
        for _, records in files
        for _, record in records
    ):
        raise UserError(
            f"--domain {domain} picks the preferred reply of DSP records, and "
            f"{' and '.join(map(str, paths))} {'holds' if len(paths) == 1 else 'hold'} none; drop --domain"
        )
    return [
        item
        for path, records in files
        for item in items_of_file(path, records, domain, log, items_of_record, one, many)
    ]


def items_of_file(path, records, domain, log, items_of_record, one: str, many: str) -> list:
    items, skipped = [], Counter()
    for where, record in records:
        try:
            items += items_of_record(record, domain, f"{path}: {where}")
        except Skip as reason:
            skipped[str(reason)] += 1
    reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
    if not items:
        raise UserError(
            f"{path} holds no usable {one}"
            + (f" ({reasons})" if reasons else " (it is empty)")
            + "; fix its records or pass another file"
        )
    log(f"{path}: {len(items)} {many}" + (f", {sum(skipped.values())} records skipped ({reasons})" if skipped else ""))
    return items


def prompt_of(record) -> list[dict] | None:
    """The conversation a record asks a reply to, or None: {"messages": [...]} ending with a user turn
    (a leading system message allowed), {"prompt": "text"}, or a record of a preference format, whose
    prompt is its conversation without the last reply. A preference record that train.py skips (an empty
    reply, say) raises Skip with the reason."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"].strip()}]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None
        if not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        ):
            return None
        if messages[-1]["role"] != "user" or any(m["role"] == "system" for m in messages[1:]):
            return None
        return [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    try:  # a preference record; DSP's needs a domain only to pick its pairs, and its prompt is the same for all
        return record_to_pairs(record, DSP_DOMAINS[0], "")[0].chosen[:-1]
    except (UserError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------
# Encoding and batching


@dataclass
class EncodedPair:
    """Token ids of both conversations; the reply starts at *_prompt_len and runs to the end."""

    chosen: list[int]
    chosen_prompt_len: int
    rejected: list[int]
    rejected_prompt_len: int


@dataclass
class EncodedConversation:
    """Token ids of one conversation to fine-tune on (SFT); the reply starts at prompt_len."""

    ids: list[int]
    prompt_len: int


def encode_conversation(messages: list[dict], tokenizer: Tokenizer, max_len: int):
    """(ids, prompt length, what truncation did) for prompt + reply, at most max_len tokens; None if
    not even the system block, the assistant header and one reply token fit.

    Truncation keeps the reply: first the oldest prompt turns are dropped (keeping the last user turn),
    then the prompt is cut from the left behind the system block, and only then is the reply's end cut.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns, reply = messages[len(system) : -1], messages[-1]
    # ChatML keeps contents as they are: a reply's leading whitespace would merge with the header's newline
    # into other tokens than the model sees when it starts a reply after the generation prompt
    reply = {**reply, "content": reply["content"].lstrip()}
    done = set()

    def encode(turns):
        prompt = tokenizer.encode_chat(system + turns, add_generation_prompt=True)
        full = tokenizer.encode_chat(system + turns + [reply])
        assert full[: len(prompt)] == prompt, "the prompt must be a token prefix of the conversation"
        reply_ids = full[len(prompt) :]
        # the reply ends with its end-of-turn token (ChatML's template writes a newline after it,
        # which no reply generates)
        return prompt, reply_ids[: len(reply_ids) - reply_ids[::-1].index(tokenizer.eot_id)]

    prompt, reply_ids = encode(turns)
    while len(prompt) + len(reply_ids) > max_len and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start the remaining history with a user turn
            turns = turns[1:]
        prompt, reply_ids = encode(turns)
        done.add("dropped_turns")
    if len(prompt) + len(reply_ids) <= max_len:
        return prompt + reply_ids, len(prompt), done

    if not system and tokenizer.default_system is not None:  # ChatML: the template's default system turn leads
        system = [{"role": "system", "content": tokenizer.default_system}]
    # the system turn (Llama 3.1: <|begin_of_text|> + the system block)
    system_block = tokenizer.encode_chat(system)
    # assistant header
    header = len(tokenizer.encode_chat(system, add_generation_prompt=True)) - len(system_block)
    # prompt tokens after the system block that fit
    room = max_len - len(system_block) - len(reply_ids)
    if room >= header:
        done.add("prompt_cut")
        kept = prompt[len(prompt) - room :] if room > 0 else []
        ids = system_block + kept + reply_ids
        return ids, len(ids) - len(reply_ids), done
    reply_room = max_len - len(system_block) - header
    if reply_room < 1:
        return None
    done.add("reply_cut")
    prompt = system_block + prompt[len(prompt) - header :]
    return prompt + reply_ids[:reply_room], len(prompt), done


def encode_pairs(pairs: list[Pair], tokenizer: Tokenizer, max_len: int, log=print) -> list[EncodedPair]:
    """Encode every pair (chosen and rejected each with its own prompt); prints what truncation did."""
    encoded, counts = [], Counter()
    for pair in pairs:
        chosen = encode_conversation(pair.chosen, tokenizer, max_len)
        rejected = encode_conversation(pair.rejected, tokenizer, max_len)
        if chosen is None or rejected is None:
            counts["skipped: longer than max_len even when cut"] += 1
            continue
        encoded.append(EncodedPair(chosen[0], chosen[1], rejected[0], rejected[1]))
        for action in chosen[2] | rejected[2]:
            counts[action] += 1
    log(
        f"{len(encoded)} of {len(pairs)} pairs encoded at max_len {max_len}: "
        f"{counts['dropped_turns']} lost their oldest turns, {counts['prompt_cut']} had the prompt cut, "
        f"{counts['reply_cut']} had a reply cut, "
        f"{counts['skipped: longer than max_len even when cut']} skipped (too long even when cut)"
    )
    return encoded


def encode_conversations(
    conversations: list[list[dict]], tokenizer: Tokenizer, max_len: int, log=print
) -> list[EncodedConversation]:
    """Encode every conversation to fine-tune on, truncated as pairs are; prints what truncation did."""
    encoded, counts = [], Counter()
    for conversation in conversations:
        result = encode_conversation(conversation, tokenizer, max_len)
        if result is None:
            counts["skipped"] += 1
            continue
        encoded.append(EncodedConversation(result[0], result[1]))
        counts.update(result[2])
    log(
        f"{len(encoded)} of {len(conversations)} conversations encoded at max_len {max_len}: "
        f"{counts['dropped_turns']} lost their oldest turns, {counts['prompt_cut']} had the prompt cut, "
        f"{counts['reply_cut']} had the reply cut, {counts['skipped']} skipped (too long even when cut)"
    )
    return encoded


def collate(batch: list[EncodedPair] | list[EncodedConversation], pad_id: int):
    """tokens and response_mask, right-padded to the longest: for pairs (2B, T), the B chosen sequences,
    then their rejected partners in the same order; for conversations (SFT) (B, T). Causal attention
    never looks at the right padding, and the mask leaves it out of the loss."""
    if isinstance(batch[0], EncodedConversation):
        rows = [(c.ids, c.prompt_len) for c in batch]
    else:
        rows = [(p.chosen, p.chosen_prompt_len) for p in batch] + [(p.rejected, p.rejected_prompt_len) for p in batch]
    T = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (ids, prompt_len) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        response_mask[i, prompt_len : len(ids)] = True
    return tokens, response_mask
