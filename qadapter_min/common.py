"""What every script shares: the device and dtype, files written whole or not at all, small JSON files,
--help with defaults, and how a script ends on a user's mistake or on Ctrl-C."""

import argparse
import functools
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qadapter_min import UserError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@functools.cache
def file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 less the process's umask (os.umask can only be
    read by setting it, so it is put straight back, once, at the first write)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def default_device(local_rank: int = 0) -> torch.device:
    """The GPU of this process when there is one, else the CPU."""
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def choose_dtype(flag: str | None, device: torch.device) -> torch.dtype:
    """--dtype as given; without it bf16 on a GPU (the paper's Llama-3.1 runs) and fp32 on a CPU (exact, and
    bf16 matrix products are slow on most CPUs)."""
    return DTYPES[flag or ("bf16" if device.type == "cuda" else "fp32")]


def atomic_write(path: Path, write):
    """Write through a temporary file in the same directory, then rename: a crash leaves the old file or
    the new one, never half of one. Every file gets the mode a plain open() would give it (0644 under
    the usual umask), whatever the writer's own choice."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:  # Ctrl-C or a full disk: leave no half-written temporary behind
        temporary.unlink(missing_ok=True)
        raise


def check_output_file(flag: str, path) -> Path:
    """Refuse, before any work, an output file that could not be written at the end: a directory
    where a file is wanted, or a file whose directory is missing, is a file, or is not writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--{flag} {path} is a directory; pass a file name")
    parent = path.absolute().parent
    if not parent.exists():
        raise UserError(f"--{flag} {path}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UserError(f"--{flag} {path}: {parent} is a file, not a directory; pass another --{flag}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--{flag} {path}: {parent} is not writable; pass another --{flag}")
    return path


def check_output_dir(flag: str, path) -> Path:
    """Refuse, before any work, an output directory that could not be made or written: a file, or
    a path under a file, or under a directory that is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--{flag} {path} is a file; pass a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--{flag} {path}: {existing} is a file, not a directory; pass another --{flag}")
    if not os.access(existing, os.W_OK):
        raise UserError(f"--{flag} {path}: {existing} is not writable; pass a directory you can write to")
    return path


def write_json(path: Path, value: dict):
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))


def read_json_file(path: Path, missing_hint: str, invalid_hint: str) -> dict:
    """A small JSON file (a config), or a UserError naming it with the hint for a missing or an invalid file."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; {missing_hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); {invalid_hint}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object; {invalid_hint}")
    return config


def read_jsonl(path: Path, hint: str) -> list[dict]:
    """The rows of a JSON Lines file this project wrote (metrics.jsonl), or a UserError naming the file and
    the line, with the hint."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; {hint}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {number} is not JSON; {hint}") from None
    return rows


class Progress:
    """A line on stderr that says how far a long piece of work is: "label: done/total unit, rate,
    ETA", rewritten in place at most once a second, by rank 0 alone; stdout keeps the results."""

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.started = self.shown = time.time()
        self.speaks = os.environ.get("RANK", "0") == "0" and total > 0

    def advance(self, n: int = 1):
        self.done += n
        now = time.time()
        if self.speaks and (now - self.shown >= 1 or self.done >= self.total):
            self.shown, rate = now, self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            end = "\n" if self.done >= self.total else ""
            print(
                f"\r{self.label}: {self.done}/{self.total} {self.unit}, {rate:.1f}/s, ETA {eta:.0f}s ",
                end=end,
                file=sys.stderr,
                flush=True,
            )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


class Parser(argparse.ArgumentParser):
    """Every script's command line: --help keeps the docstring's layout and shows each default, and a
    refusal is one sentence that names the flag ("--lr must be > 0, got -1.0"): a UserError, so the script
    prints one line and exits 2 (run_command_line)."""

    def __init__(self, description: str = ""):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message: str):
        flag = re.match(r"argument ([-\w]+)(?:/[-\w]+)?: ", message)  # argparse's "argument --lr: ..."
        if flag:
            rest = message[flag.end() :]
            message = f"{flag[1]} {rest}" if rest.startswith("must") else f"{flag[1]}: {rest}"
        raise UserError(message)


def add_compile_flag(parser, what: str = "each decoding step"):
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"run {what} through torch.compile (qadapter_min/compiled.py); the first call of each "
        f"shape pays the compilation",
    )


def checked(kind, rule: str, holds):
    """A flag's type that refuses a value outside its range: kind(text), unless not holds(value), in words
    `rule` ("> 0"). Written once here, so every script checks its flags the same way."""

    def value_of(text: str):
        value = kind(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    value_of.__name__ = kind.__name__  # argparse's own refusal names it: "invalid int value: 'x'"
    return value_of


POSITIVE_INT, POSITIVE = checked(int, "> 0", lambda v: v > 0), checked(float, "> 0", lambda v: v > 0)
COUNT, NON_NEGATIVE = checked(int, ">= 0", lambda v: v >= 0), checked(float, ">= 0", lambda v: v >= 0)
FINITE_NON_NEGATIVE = checked(float, "finite and >= 0", lambda v: math.isfinite(v) and v >= 0)


LAUNCHED = "QADAPTER_LAUNCHED"  # set in the processes launch starts: their command line was printed


def parse_or_default(parser, argv: list[str], names: tuple[str, ...], default: list[str], script: str):
    """The flags typed; where none of `names` is typed, the flags of `default` first and those typed after
    them (which win), printed once as the command they amount to. How a bare train.py or evaluate.py runs
    the built-in world: `default` is its flags, shown in --help."""
    parser.epilog = f"A bare `python {script}` runs the built-in world as:\n  python {script} {shlex.join(default)}"
    args = parser.parse_args(argv)
    if any(getattr(args, name) is not None for name in names):
        return args
    typed = {word for word in argv if word.startswith("--")}
    argv = [*without_flags(default, typed), *argv]  # each flag once: a typed one wins
    if os.environ.get("RANK", "0") == "0" and LAUNCHED not in os.environ:  # printed once
        print(f"built-in world: python {script} {shlex.join(argv)}", flush=True)
    return parser.parse_args(argv)


def without_flags(argv: list[str], flags: set[str]) -> list[str]:
    """argv without the flags named (each with the values that follow it, up to the next flag)."""
    kept, dropping = [], False
    for word in argv:
        if word.startswith("--"):
            dropping = word in flags
        if not dropping:
            kept.append(word)
    return kept


def run_command_line(main):
    """Run a script's main() as a command: a UserError prints one line, "error: ...", and exits 2, with no
    traceback; Ctrl-C prints one line (what was reached, what to do next) and exits 130, as shells expect.

    With several processes every rank meets the same data and flags, so rank 0 speaks for all; an error
    of one rank alone (out of memory) names its rank. A rank that fails leaves without the process group's
    shutdown, which would wait for ranks that wait for it, and the launcher (or torchrun) then ends the
    others; on a refusal the ranks other than 0 leave a moment later, so that rank 0 has said why.
    """
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        main()
        return
    except UserError as error:
        if speaks or str(error).startswith("rank "):
            print(f"error: {error}", file=sys.stderr, flush=True)
        elif dist.is_initialized() or "RANK" in os.environ:
            time.sleep(2)  # rank 0 says why: the launcher ends the others once one has ended
        code = 2
    except KeyboardInterrupt as interrupt:
        if speaks:
            print(f"\ninterrupted{': ' + str(interrupt) if str(interrupt) else ''}", file=sys.stderr, flush=True)
        code = 130
    if dist.is_initialized():
        os._exit(code)
    sys.exit(code)


def sharded(tensor: torch.Tensor) -> bool:
    """Whether tensor is a DTensor (sharded over the ranks, under train.py --fsdp). The DTensor module takes
    half a second to import, so it is looked up only once something (sharding.py) has imported it: until
    then no tensor can be one."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def is_fsdp_model(model: torch.nn.Module) -> bool:
    """Whether the model runs sharded over the ranks (sharding.py's fully_shard makes it an FSDPModule;
    looked up only once something has imported FSDP, as in `sharded`)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from the ranks if it is sharded (every rank must call this), else the
    tensor itself."""
    return tensor.full_tensor() if sharded(tensor) else tensor


def like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as param is: this rank's shard of it if param is sharded, else itself."""
    whole = whole.to(device=param.device, dtype=param.dtype)
    if not sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor  # loaded already: param is a DTensor

    return distribute_tensor(whole, param.device_mesh, param.placements)
