"""The documentation holds together: every relative link in README.md and docs/*.md resolves (and
every #anchor names a heading of its target, as GitHub spells it), the README stays short, and
its two set-up commands are the ones CI relies on."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)     # fenced code blocks
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text):
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # a link in a heading: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen, out = {}, set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path):
    """(target, line) for every link of a page that is not a URL."""
    text = prose(path.read_text(encoding="utf-8"))
    return [m.group(1) for m in LINK.finditer(text)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", m.group(1), re.I)]


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "recipe.md", "evaluation.md", "ablation.md", "performance.md", "gpu.md",
            "history.md"} <= names


def test_slug_follows_github():
    assert slug("The recipe against U-ViT's") == "the-recipe-against-u-vits"
    assert slug("2026-11-27: the clip loss with v, and s = 0.6") == "2026-11-27-the-clip-loss-with-v-and-s--06"
    assert slug("From Python") == "from-python"
    assert slug("`tinyuvit bench`") == "tinyuvit-bench"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def _commands(line):
    """A shell line's commands split at &&, each as tokens with `python[3] -m` dropped and pip's -q
    (it changes only what pip prints) left out."""
    out = []
    for part in line.split("&&"):
        tokens = shlex.split(part)
        if len(tokens) > 2 and re.fullmatch(r"python3?", tokens[0]) and tokens[1] == "-m":
            tokens = tokens[2:]
        if tokens[:2] == ["pip", "install"]:
            tokens = [t for t in tokens if t not in ("-q", "--quiet")]
        out.append(tokens)
    return out


def _readme_code_lines():
    code = "\n".join(m.group(0) for m in FENCE.finditer(README.read_text(encoding="utf-8")))
    return [line.strip() for line in code.splitlines() if line.strip() and not line.startswith(("```", "~~~"))]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_steps = [c for line in ci.splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
                for c in _commands(line.strip())]
    tests = [line for line in _readme_code_lines() if "pytest" in line]
    assert len(tests) == 1, f"expected one test command in README.md's code blocks, found {tests}"
    assert _commands(tests[0]) == ci_steps, f"README: {tests[0]!r}; .ci/run runs {ci_steps}"


def test_readme_train_command_is_the_installed_entry_point():
    lines = [line for line in _readme_code_lines() if "train-mnist" in line and "pip install" in line]
    assert lines, "README.md's set-up: no `pip install ... && tinyuvit train-mnist` line"
    install, run = _commands(lines[0])
    assert install == ["pip", "install", "-e", "."] and run[:2] == ["tinyuvit", "train-mnist"], lines[0]
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    entry = re.search(r"[\"']tinyuvit\s*=\s*([\w.]+):(\w+)[\"']", setup)
    assert entry, "setup.py declares no `tinyuvit` console script"
    main = getattr(importlib.import_module(entry.group(1)), entry.group(2))
    assert "train-mnist" in main.commands
