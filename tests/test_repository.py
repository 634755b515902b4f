"""The repository explains itself: every document it names is one it holds."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITTEN = {
    "summary.md",
    "table.md",
    "frontier.md",
    "learning.md",
}  # what bench.py --check and tools/smollm2_study.py write, not documents cited


def test_every_markdown_file_named_in_the_repository_is_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    named = set()
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".toml", ".txt") or name == ".ci/run":
            named |= {(name, ref) for ref in re.findall(r"[\w./-]*\w\.md\b", path.read_text())}
    assert named, "the scan found no reference at all, so it would prove nothing"
    missing = [
        (name, ref)
        for name, ref in named
        if not (ROOT / ref).is_file()
        and not (ROOT / name).parent.joinpath(ref).is_file()
        and Path(ref).name not in WRITTEN
    ]
    assert not missing, missing


TEACHING_PATH = ["qadapter_min/model.py", "qadapter_min/lora.py", "qadapter_min/objective.py", "train.py"]


def test_the_code_passes_the_linter_and_the_formatter():
    """ruff, configured in pyproject.toml: lint rules with no line over 120 characters, and every file
    as the formatter writes it (at 100)."""
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_teaching_path_is_read_in_one_sitting():
    """model.py + lora.py + objective.py + train.py: at most 1,200 lines together (train.py 350,
    objective.py 200), and at most 2% of them over 100 characters."""
    lines = {name: (ROOT / name).read_text().splitlines() for name in TEACHING_PATH}
    total = sum(len(text) for text in lines.values())
    assert total <= 1200, total
    assert len(lines["train.py"]) <= 350 and len(lines["qadapter_min/objective.py"]) <= 200
    wide = [line for text in lines.values() for line in text if len(line) > 100]
    assert len(wide) <= 0.02 * total, wide


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    links = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: leave the repository
                links.append((page, target))
    assert len(links) >= 10, links  # the scan finds the README's links, so it can fail
    broken = []
    for page, target in links:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in heading_anchors(linked.read_text())):
            broken.append((page.name, target))
    assert not broken, broken
