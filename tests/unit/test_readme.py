"""README.md stays a five-minute read whose links work and whose two commands are the ones CI runs.

- README has at most 170 lines; the detail lives in docs/*.md.
- Every relative link and image in README.md and docs/*.md names a file in the repository (http(s) links and
  `#anchors` are skipped, `#fragment`s stripped; code blocks and inline code are not links).
- README's install-and-run command and its install-and-test command are there verbatim, and the test command is
  the one .ci/run runs as "README's test command", with the `test` extra pyproject.toml declares.
"""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 170

RUN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "fipray paths --config jobs/configs/ensemble_digits.yaml --num-paths 2 --out runs/paths"
)
TEST_SELECTION = 'python -m pytest -q -m "not slow and not heavy"'
TEST_COMMAND = f'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && {TEST_SELECTION}'

# Links committed ahead of the page they name, allowed only while that page is missing (the test fails once it
# exists, so the entry is removed with the page's commit rather than forgotten). Keep this empty otherwise.
PENDING: dict[tuple[str, str], str] = {}  # (page, target): a link allowed to dangle until its page is written

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), an optional "title" after the target.
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _links(text: str) -> list[str]:
    """The link and image targets of a markdown text, outside code."""
    prose = _INLINE_CODE.sub("", _FENCE.sub("", text))
    return _LINK.findall(prose)


def test_link_parser_sees_links_and_skips_code():
    # Not vacuous: the parser finds prose links and images and ignores what sits in code.
    text = "see [a](docs/a.md#x) and ![p](img/p.png)\n`[b](nope.md)`\n```\n[c](nope2.md)\n```\n[d](https://x.y)"
    assert _links(text) == ["docs/a.md#x", "img/p.png", "https://x.y"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_relative_links_and_images_resolve():
    broken = []
    checked = 0
    for page in _pages():
        for target in _links(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s)://, mailto:, an anchor on the same page
            path = target.split("#", 1)[0]
            resolved = (page.parent / path).resolve()
            checked += 1
            ok = resolved.is_file() and resolved.is_relative_to(ROOT)
            key = (page.relative_to(ROOT).as_posix(), target)
            if key in PENDING:
                assert not ok, f"{key[0]} -> {target} resolves now: remove it from PENDING"
                continue
            if not ok:
                broken.append(f"{key[0]}: {target}")
    assert checked >= 20, "too few links found: the parser is broken"
    assert not broken, "links that name no file in the repository:\n" + "\n".join(broken)


def test_readme_and_docs_point_at_our_protocols_not_shared():
    for page in _pages():
        assert "shared/" not in page.read_text(encoding="utf-8"), f"{page.relative_to(ROOT)} points at shared/"
    assert "docs/protocols.md" in README.read_text(encoding="utf-8")


def test_readme_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert RUN_COMMAND in text
    assert TEST_COMMAND in text
    assert (ROOT / "jobs/configs/ensemble_digits.yaml").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^fipray = ", pyproject, re.M), "the fipray console script"
    assert re.search(r"^test = \[", pyproject, re.M), "the test extra README installs"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -q -e ".[test]"' in ci
    tier = re.search(r"^run_tier \"README's test command\" (.+?)(?: \|\|.*)?$", ci, re.M)
    assert tier, ".ci/run has no README tier line"
    assert shlex.split(tier.group(1)) == shlex.split(TEST_SELECTION)[3:]
