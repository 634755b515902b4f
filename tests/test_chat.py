"""sample.py's chat on a terminal, driven through a pseudo-terminal as a person would type: history
recall, Ctrl-C during a reply, /reset and /system."""

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
UP = "\x1b[A"  # the up-arrow key
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def become_the_terminals_session():
    """In the child: lead a session whose controlling terminal is the pseudo-terminal, so that Ctrl-C
    typed there is SIGINT to it, as in a shell."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """sample.py's chat on the slave side of a pseudo-terminal; we type on the master side."""

    def __init__(self, *flags):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "sample.py"), *map(str, flags)],
            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True,
            preexec_fn=become_the_terminals_session,
        )  # fmt: skip
        os.close(slave)
        self.seen = self.raw = ""  # what is still to be matched (ANSI codes removed); all of it

    def read_until(self, pattern: str, timeout: float = 60) -> str:
        """What the terminal shows up to the next match of pattern (ANSI codes removed)."""
        deadline = time.time() + timeout
        while not re.search(pattern, ANSI.sub("", self.seen)):
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"waited for {pattern!r}; the terminal shows {self.seen!r}")
            try:
                self.receive()
            except OSError:  # the process has closed the terminal
                raise AssertionError(f"ended before {pattern!r}: {self.seen!r}") from None
        shown = ANSI.sub("", self.seen)
        end = re.search(pattern, shown).end()
        self.seen = shown[end:]
        return shown[:end]

    def line_shown(self, timeout: float = 10) -> str:
        """The terminal's current line as it looks once drawing stops: carriage returns, cursor moves
        and clears applied, as a terminal applies them."""
        deadline = time.time() + timeout
        while time.time() < deadline and select.select([self.master], [], [], 0.3)[0]:
            self.receive()
        line, column = [], 0
        raw = self.raw.rsplit("\n", 1)[-1]
        for token in re.findall(r"\x1b\[\d*[A-Za-z]|\x1b\[\?\d+[hl]|[\s\S]", raw):
            if token == "\r":
                column = 0
            elif token.startswith("\x1b[") and token.endswith("C"):
                column += int(token[2:-1] or 1)
            elif token.startswith("\x1b[") and token.endswith("D"):
                column -= int(token[2:-1] or 1)
            elif token.startswith("\x1b[") and token.endswith("K"):
                del line[column:]
            elif token == "\b":
                column -= 1
            elif not token.startswith("\x1b"):
                line += [" "] * (column + 1 - len(line))
                line[column] = token
                column += 1
        return "".join(line).rstrip()

    def receive(self):
        text = os.read(self.master, 4096).decode("utf-8", errors="replace")
        self.seen, self.raw = self.seen + text, self.raw + text

    def type(self, keys: str):
        os.write(self.master, keys.encode())

    def close(self) -> int:
        self.type("\x04")  # Ctrl-D
        code = self.process.wait(timeout=30)
        os.close(self.master)
        return code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):
    return tiny_model_dir(tmp_path_factory.mktemp("chat") / "model", tokenizer_file)


def reply_to(terminal: Terminal, keys: str) -> str:
    """Type keys and Enter; the reply shown before the next prompt."""
    terminal.type(keys + "\r")
    shown = terminal.read_until(r"\n> $")
    return shown.split("\n", 1)[1].rsplit("\n", 1)[0]  # after the echoed line, before the prompt


def test_history_recall_gives_back_the_typed_line_and_reset_forgets_the_conversation(model_dir):
    terminal = Terminal("--model", model_dir, "--temperature", 0, "--max_new_tokens", 6)
    terminal.read_until(r"> $")
    first = reply_to(terminal, "hello there")
    second = reply_to(terminal, "and again")
    terminal.type("/reset\r")
    terminal.read_until(r"a new conversation\)\n> $")
    terminal.type(UP + UP + UP)  # back over /reset and "and again" to the first line
    assert terminal.line_shown() == "> hello there"  # the prompt kept, the line recalled whole
    terminal.seen = ""  # what the recall drew: reply_to reads from the Enter on
    recalled = reply_to(terminal, "")
    assert recalled == first  # the same line, greedy, in a new conversation: the same reply
    assert first != second or second == ""  # the second reply continued a conversation
    assert terminal.close() == 0


def test_ctrl_c_stops_a_reply_and_returns_to_the_prompt_with_the_conversation_kept(model_dir):
    """An exchange, a reply stopped by Ctrl-C, then another exchange: the last reply is the one a
    chat without the stopped exchange gives (greedy), so the conversation before it was kept."""
    flags = ["--model", model_dir, "--temperature", 0, "--max_new_tokens", 150]
    terminal = Terminal(*flags)
    terminal.read_until(r"> $")
    first = reply_to(terminal, "hello")
    terminal.type("tell me everything\r")
    terminal.read_until(r"tell me everything\n.")  # the reply has begun
    terminal.type("\x03")  # Ctrl-C
    terminal.read_until(r"reply stopped; the conversation goes on from before it\)\n> $")
    last = reply_to(terminal, "and again")
    assert terminal.close() == 0

    uninterrupted = Terminal(*flags)
    uninterrupted.read_until(r"> $")
    assert reply_to(uninterrupted, "hello") == first
    assert reply_to(uninterrupted, "and again") == last
    assert uninterrupted.close() == 0


@pytest.mark.slow  # out of CI's six minutes: python -m pytest -m slow
def test_system_sets_the_system_message_and_starts_a_new_conversation(model_dir):
    flags = ["--model", model_dir, "--temperature", 0, "--max_new_tokens", 6]
    with_system = Terminal(*flags, "--system", "Be brief.")
    with_system.read_until(r"> $")
    expected = reply_to(with_system, "hello")
    assert with_system.close() == 0
    terminal = Terminal(*flags)
    terminal.read_until(r"> $")
    reply_to(terminal, "something else first")
    terminal.type("/system Be brief.\r")
    terminal.read_until(r"system message set\)\n> $")
    assert reply_to(terminal, "hello") == expected
    assert terminal.close() == 0
