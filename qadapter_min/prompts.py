"""Prompts to reply to (sample.py --prompts, evaluate.py --prompts): a JSON Lines file of records, each a
conversation ending with a user turn, a bare prompt, or a preference record of a format data.py reads, whose
prompt is its conversation without the last reply."""

import json
import sys
from collections import Counter
from pathlib import Path

from qadapter_min import UserError
from qadapter_min.data import Skip, is_unicode, prompt_of


def load_prompts(
    path, unique: bool = False, log=lambda message: print(message, file=sys.stderr)
) -> list[tuple[dict, list[dict]]]:
    """(record, conversation to reply to) for every line of a JSON Lines prompts file, in order (unique:
    only the first record of each distinct conversation); a file that cannot be used is refused in one
    sentence naming it and the line. Preference records that train.py skips are skipped here too, and
    counted (on stderr: stdout may hold the replies)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"--prompts {path} {what}; pass a JSON Lines file, one prompt record per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path} is not UTF-8 text; pass a JSON Lines file") from None
    items, skipped = [], Counter()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {number} is not JSON ({error.msg}); --prompts takes JSON Lines") from None
        try:
            messages = prompt_of(record)
        except Skip as reason:
            skipped[str(reason)] += 1
            continue
        if messages is None:
            raise UserError(
                f'{path}: line {number} holds no conversation to reply to; expected {{"messages": [...]}} ending '
                f'with a user turn, {{"prompt": "..."}}, or a preference record'
            )
        if not all(is_unicode(m["content"]) for m in messages):
            raise UserError(
                f"{path}: line {number} holds text that is not valid Unicode (a lone surrogate, as "
                f"in \\ud83d without its pair); fix that line"
            )
        items.append((record, messages))
    if skipped:
        log(
            f"{path}: {sum(skipped.values())} records skipped, as train.py skips them "
            f"({', '.join(f'{n} {why}' for why, n in skipped.most_common())})"
        )
    if not items:
        raise UserError(f"--prompts {path} is empty; pass a JSON Lines file, one prompt record per line")
    if unique:
        first = {}
        for record, messages in items:
            first.setdefault(json.dumps(messages), (record, messages))
        items = list(first.values())
    return items
