"""Preference data: the three formats, messy records, truncation that keeps the reply, batching."""

import gzip
import json

import pytest

from conftest import FIXTURES
from qadapter_min import UserError
from qadapter_min.data import (
    DSP_RESPONSES,
    EncodedPair,
    Pair,
    collate,
    encode_conversation,
    encode_pairs,
    load_conversations,
    load_pairs,
)
from qadapter_min.prompts import load_prompts
from qadapter_min.tokenizer import Tokenizer


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HH_RECORD = {
    "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?  \n\nAssistant: Yes: \n\n2+2 = 4.",
    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?  \n\nAssistant: No.",
}
HH_AS_CONVERSATIONS = {
    "chosen": [user("What is 2+2?"), assistant("It is 4."), user("Sure?"), assistant("Yes: \n\n2+2 = 4.")],
    "rejected": [user("What is 2+2?"), assistant("It is 4."), user("Sure?"), assistant("No.")],
}


def quiet(*_):
    pass


def test_hh_rlhf_text_and_its_conversational_form_load_into_identical_conversations(tmp_path):
    hh = load_pairs(write_jsonl(tmp_path / "hh.jsonl.gz", [HH_RECORD], gz=True), log=quiet)
    conversational = load_pairs(write_jsonl(tmp_path / "conv.json", [HH_AS_CONVERSATIONS]), log=quiet)
    assert [(p.chosen, p.rejected) for p in hh] == [(p.chosen, p.rejected) for p in conversational]
    assert hh[0].chosen == HH_AS_CONVERSATIONS["chosen"]  # inner whitespace kept, ends stripped


def test_a_json_array_file_loads_like_json_lines(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps([HH_AS_CONVERSATIONS, HH_AS_CONVERSATIONS], indent=2))
    pairs = load_pairs(tmp_path / "array.json", log=quiet)
    assert len(pairs) == 2 and pairs[1].rejected[-1] == assistant("No.")


def test_dsp_gives_four_pairs_per_query_with_the_domain_reply_preferred(tmp_path):
    record = {
        "query": "Tell me about stars.",
        "responses": {d: f"{d} answer" for d in ("academy", "business", "entertainment", "literature", "normal")},
    }
    pairs = load_pairs(write_jsonl(tmp_path / "dsp.json", [record]), domain="business", log=quiet)
    assert len(pairs) == 4
    assert all(p.chosen == [user("Tell me about stars."), assistant("business answer")] for p in pairs)
    assert sorted(p.rejected[-1]["content"] for p in pairs) == [
        "academy answer",
        "entertainment answer",
        "literature answer",
        "normal answer",
    ]
    with pytest.raises(UserError, match="DSP data, which needs a domain: pass --domain"):
        load_pairs(tmp_path / "dsp.json", log=quiet)
    with pytest.raises(UserError, match="--domain 'sports' is not a DSP domain"):
        load_pairs(tmp_path / "dsp.json", domain="sports", log=quiet)


def test_replays_data_beside_dsps_takes_the_domain_and_a_domain_needs_dsp_in_some_file(tmp_path):
    """Replay on DSP: train.py --data dsp.json replay.jsonl --domain D, the replies carrying no domain."""
    dsp = write_jsonl(tmp_path / "dsp.json", [{"query": "Q?", "responses": {d: f"{d} answer" for d in DSP_RESPONSES}}])
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"prompt": "Q?", "reply": "own answer"}])
    conversations = load_conversations([dsp, replay], domain="academy", log=quiet)
    assert conversations == [*[[user("Q?"), assistant("academy answer")]] * 4, [user("Q?"), assistant("own answer")]]
    with pytest.raises(UserError, match=r"replay.jsonl holds none; drop --domain"):
        load_conversations([replay], domain="academy", log=quiet)


def test_messy_records_are_skipped_and_counted(tmp_path):
    good = HH_AS_CONVERSATIONS
    records = [
        good,
        {"chosen": [user("hi"), assistant("   ")], "rejected": [user("hi"), assistant("hello")]},  # empty reply
        {"chosen": [user("hi"), assistant("a"), user("b")], "rejected": good["rejected"]},  # ends with the user
        {"chosen": [{"role": "narrator", "content": "x"}, assistant("a")], "rejected": good["rejected"]},
        {"chosen": [user("hi"), assistant(["a", "list"])], "rejected": good["rejected"]},  # content not a string
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},  # HH, empty
    ]
    lines = []
    pairs = load_pairs(write_jsonl(tmp_path / "messy.jsonl", records), log=lines.append)
    assert len(pairs) == 1
    assert lines == [
        f"{tmp_path / 'messy.jsonl'}: 1 pairs, 5 records skipped (2 empty reply, 1 last message not from the "
        f"assistant, 1 unknown role, 1 content that is not a string)"
    ]


def test_trls_explicit_prompt_form_loads_into_the_conversations_of_the_conversational_form(tmp_path):
    explicit = {
        "prompt": HH_AS_CONVERSATIONS["chosen"][:-1],
        "chosen": HH_AS_CONVERSATIONS["chosen"][-1:],
        "rejected": HH_AS_CONVERSATIONS["rejected"][-1:],
    }
    [got] = load_pairs(write_jsonl(tmp_path / "trl.jsonl", [explicit]), log=quiet)
    [want] = load_pairs(write_jsonl(tmp_path / "conv.jsonl", [HH_AS_CONVERSATIONS]), log=quiet)
    assert (got.chosen, got.rejected) == (want.chosen, want.rejected)


def test_trls_plain_text_form_is_one_user_message_and_two_assistant_replies(tmp_path):
    plain = {"prompt": "What is 2+2? ", "chosen": " It is 4.", "rejected": "Five."}
    conversational = {
        "chosen": [user("What is 2+2?"), assistant("It is 4.")],
        "rejected": [user("What is 2+2?"), assistant("Five.")],
    }
    [got] = load_pairs(write_jsonl(tmp_path / "trl.jsonl", [plain]), log=quiet)
    [want] = load_pairs(write_jsonl(tmp_path / "conv.jsonl", [conversational]), log=quiet)
    assert (got.chosen, got.rejected) == (want.chosen, want.rejected)


def test_a_malformed_line_is_named_with_its_number(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(HH_AS_CONVERSATIONS) + "\n" + '{"chosen": [oops\n')
    with pytest.raises(UserError, match=r"broken\.jsonl: malformed JSON at line 2"):
        load_pairs(path, log=quiet)


def test_a_record_in_no_known_format_is_named(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [HH_AS_CONVERSATIONS, {"prompt": "x", "answer": "y"}])
    with pytest.raises(UserError, match=r"odd\.jsonl: line 2 is in no known preference format"):
        load_pairs(path, log=quiet)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nothing\.json does not exist"):
        load_pairs(tmp_path / "nothing.json", log=quiet)


def test_chosen_and_rejected_each_get_their_own_prompt(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    pair = Pair(
        chosen=[user("Hello!"), assistant("Hi.")],
        rejected=[user("Hello there, friend!"), assistant("Go away.")],
        source="test",
    )
    [encoded] = encode_pairs([pair], tok, max_len=512, log=quiet)
    for ids, prompt_len, conversation in [
        (encoded.chosen, encoded.chosen_prompt_len, pair.chosen),
        (encoded.rejected, encoded.rejected_prompt_len, pair.rejected),
    ]:
        assert ids == tok.encode_chat(conversation)
        assert ids[:prompt_len] == tok.encode_chat(conversation[:1], add_generation_prompt=True)
        assert tok.decode(ids[prompt_len:]) == conversation[1]["content"] + "<|eot_id|>"  # the reply and its end


def long_conversation():
    return [
        {"role": "system", "content": "Be brief."},
        user("first question " * 10),
        assistant("first answer " * 10),
        user("second question " * 10),
        assistant("second answer " * 10),
        user("last question"),
        assistant("the reply"),
    ]


def test_truncation_drops_the_oldest_turns_first_and_keeps_the_system_block(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    conversation = long_conversation()
    full = len(tok.encode_chat(conversation))
    without_first_exchange = conversation[:1] + conversation[3:]
    ids, prompt_len, done = encode_conversation(conversation, tok, max_len=full - 1)
    assert done == {"dropped_turns"}
    assert ids == tok.encode_chat(without_first_exchange)
    assert tok.decode(ids[prompt_len:]) == "the reply<|eot_id|>"


def test_then_the_prompt_is_cut_from_the_left_behind_the_system_block(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    conversation = long_conversation()
    last_turn_only = conversation[:1] + conversation[-2:]
    max_len = len(tok.encode_chat(last_turn_only)) - 2
    ids, prompt_len, done = encode_conversation(conversation, tok, max_len=max_len)
    assert done == {"dropped_turns", "prompt_cut"} and len(ids) == max_len
    system_block = tok.encode_chat(conversation[:1])
    assert ids[: len(system_block)] == system_block
    assert ids[prompt_len:] == tok.encode_chat(last_turn_only)[-len(tok.encode("the reply")) - 1 :]  # whole reply kept
    assert ids[len(system_block) :] == tok.encode_chat(last_turn_only)[len(system_block) + 2 :]  # 2 prompt tokens cut


def test_a_chatml_reply_is_its_text_and_im_end_after_the_templates_own_tokens():
    """Against transformers' rendering of SmolLM2's template: the conversation's ids are the template's, less
    the newline the template writes after the last <|im_end|>, which no reply generates."""
    tok = Tokenizer(FIXTURES / "tiny-chatml")
    golden = json.loads((FIXTURES / "tiny-chatml" / "golden.json").read_text())
    newline = tok.encode("\n")
    checked = 0
    for conversation, template_ids in zip(golden["conversations"], golden["without_generation_prompt"]):
        reply = conversation[-1]["content"]
        if conversation[-1]["role"] != "assistant" or reply != reply.lstrip():  # a reply's leading space is dropped
            continue
        ids, prompt_len, done = encode_conversation(conversation, tok, max_len=10_000)
        assert done == set() and template_ids == ids + newline
        assert tok.decode(ids[prompt_len:]) == reply + "<|im_end|>"
        assert tok.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")
        checked += 1
    assert checked >= 10


def test_the_reply_end_is_cut_only_as_the_last_resort(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    conversation = [user("q"), assistant("word " * 50)]
    system_block = tok.encode_chat([])
    header = len(tok.encode_chat([], add_generation_prompt=True)) - len(system_block)
    max_len = len(system_block) + header + 5
    ids, prompt_len, done = encode_conversation(conversation, tok, max_len=max_len)
    assert "reply_cut" in done and len(ids) == max_len and prompt_len == len(system_block) + header
    reply = tok.encode_chat(conversation)[len(tok.encode_chat(conversation[:1], add_generation_prompt=True)) :]
    assert ids[prompt_len:] == reply[:5]
    assert encode_conversation(conversation, tok, max_len=len(system_block) + header) is None


def test_encode_pairs_reports_what_truncation_did(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    pairs = [
        Pair(long_conversation(), long_conversation()[:-1] + [assistant("no")], "t"),
        Pair([user("q"), assistant("a")], [user("q"), assistant("b")], "t"),
    ]
    lines = []
    encoded = encode_pairs(pairs, tok, max_len=len(tok.encode_chat(long_conversation())) - 1, log=lines.append)
    assert len(encoded) == 2
    assert "1 lost their oldest turns, 0 had the prompt cut, 0 had a reply cut, 0 skipped" in lines[0]


def test_collate_puts_chosen_rows_first_pads_right_and_masks_only_replies():
    batch = [EncodedPair([1, 2, 3, 4], 2, [1, 2, 5], 2), EncodedPair([1, 6, 7], 1, [1, 8, 9, 9, 9], 3)]
    tokens, response_mask = collate(batch, pad_id=0)
    assert tokens.tolist() == [[1, 2, 3, 4, 0], [1, 6, 7, 0, 0], [1, 2, 5, 0, 0], [1, 8, 9, 9, 9]]
    assert response_mask.int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]


def test_preference_records_that_train_py_skips_are_skipped_as_prompts_and_counted(tmp_path):
    path = tmp_path / "train.jsonl"
    usable = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    empty_reply = {"chosen": "\n\nHuman: Where?\n\nAssistant: ", "rejected": "\n\nHuman: Where?\n\nAssistant: Here."}
    path.write_text(json.dumps(usable) + "\n" + json.dumps(empty_reply) + "\n")
    said = []
    items = load_prompts(path, log=said.append)
    assert [messages for _, messages in items] == [[{"role": "user", "content": "Hi?"}]]
    assert said == [f"{path}: 1 records skipped, as train.py skips them (1 empty reply)"]
