"""The repository explains itself: every document it names is one it holds."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITTEN = {"summary.md", "table.md"}  # what tools/gpu_check.py and tools/smollm2_study.py write, not documents cited


def test_every_markdown_file_named_in_the_repository_is_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    named = set()
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".toml", ".txt") or name == ".ci/run":
            named |= {(name, ref) for ref in re.findall(r"[\w./-]*\w\.md\b", path.read_text())}
    assert named, "the scan found no reference at all, so it would prove nothing"
    missing = [(name, ref) for name, ref in named if not (ROOT / ref).is_file() and not (ROOT / name).parent.joinpath(ref).is_file()
               and Path(ref).name not in WRITTEN]
    assert not missing, missing
