"""The README is a short front door, and every link in it and in docs/ lands somewhere.

Relative links must name an existing file; a ``#anchor`` must be a heading of
the target page, spelled as GitHub spells heading anchors. Links to other
sites are not fetched.
"""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    with open(path) as f:
        text = FENCE.sub("", f.read())
    seen: dict = {}
    out = set()
    for line in text.splitlines():
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: str):
    with open(path) as f:
        text = prose(f.read())
    for match in LINK.finditer(text):
        yield match.group(2)


def test_slug_follows_github():
    assert slug("Distributed optimizer (ZeRO-1)") == "distributed-optimizer-zero-1"
    assert slug("LocMoE+") == "locmoe"
    assert slug("Why LocMoE+ is the quickstart's router") == "why-locmoe-is-the-quickstarts-router"
    assert slug("1. A token crosses to each node once (issue 14)") == \
        "1-a-token-crosses-to-each-node-once-issue-14"
    assert slug("Rounding (`moe.capacity.multiple`)") == "rounding-moecapacitymultiple"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for url in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", url):  # http:, https:, mailto:
                continue
            target, _, anchor = url.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target \
                else page
            where = f"{os.path.relpath(page, REPO)}: ({url})"
            if not os.path.exists(path):
                broken.append(f"{where}: no file {os.path.relpath(path, REPO)}")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short_and_reaches_every_docs_page():
    with open(README) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the front door keeps to 300"
    # Every docs page is reachable from the README by links (nothing moved out is lost).
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for url in links(page):
            target = url.partition("#")[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", url):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            if path.endswith(".md") and path not in reached and os.path.exists(path):
                reached.add(path)
                todo.append(path)
    missing = [os.path.relpath(p, REPO) for p in PAGES[1:] if p not in reached]
    assert not missing, f"docs pages no link from the README leads to: {missing}"


def test_readme_keeps_the_two_commands_that_ci_runs():
    with open(README) as f:
        text = f.read()
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert f.read().strip().endswith("bash scripts/test.sh")
