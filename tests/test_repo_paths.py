"""The repository is self-contained: no tracked file points outside it, and every ``docs/`` file it names exists.

A user has only the clone, so a reference to a folder of the machine the code was written on (a sibling
``shared`` folder, a home directory, an absolute path under ``/work``, ``/farm``, ``/home`` or ``/root``) is a dead
link for them, and so is a ``docs/...`` path that was renamed or never written.
"""

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT

# built from pieces so that this file does not match its own patterns
_SHARED = "shared" + "/specs"
_OUTSIDE = re.compile("|".join([
    re.escape(_SHARED),
    re.escape(".." + "/shared"),
    r"(?<![\w.~/-])/(?:work|farm|home|root)/",
]))
_DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w")
_MD_LINK = re.compile(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)")


def tracked_text_files() -> dict[str, str]:
    """Path (relative to the repository root) -> text of every tracked file that decodes as UTF-8."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked-file list is unavailable")
    texts = {}
    for rel in filter(None, out.decode().split("\0")):
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):  # deleted in the working tree, not yet committed
            continue
        try:
            with open(path, encoding="utf-8") as f:
                texts[rel] = f.read()
        except UnicodeDecodeError:
            continue
    return texts


def _hits(texts: dict[str, str], pattern: re.Pattern) -> list[tuple[str, int, str]]:
    return [(rel, text.count("\n", 0, m.start()) + 1, m.group(0))
            for rel, text in texts.items() for m in pattern.finditer(text)]


def test_scanner_finds_what_it_must():
    """The patterns catch each forbidden form and leave ordinary text alone (guards against a pattern that
    silently matches nothing)."""
    bad = {"a.md": f"see {_SHARED}/dino.md", "b.py": "# from .." + "/shared/x", "c.yaml": "p: /" + "work/x/y",
           "d.md": "cd /" + "home/me", "e.py": "'/" + "root/.cache'"}
    assert sorted(rel for rel, _, _ in _hits(bad, _OUTSIDE)) == sorted(bad)
    fine = {"f.md": "https://example.org/home/page, runs/dino_demo, a network/home/x, ~/data/x"}
    assert _hits(fine, _OUTSIDE) == []
    refs = _hits({"g.py": "(``docs/methods/dino.md``, section 2). docs/results.md."}, _DOCS_PATH)
    assert [ref for _, _, ref in refs] == ["docs/methods/dino.md", "docs/results.md"]


def test_no_tracked_file_points_outside_the_repository():
    hits = _hits(tracked_text_files(), _OUTSIDE)
    assert not hits, "paths outside the repository (write the fact into docs/ instead):\n" + "\n".join(
        f"  {rel}:{line}: {ref}" for rel, line, ref in hits)


def test_every_docs_path_that_is_mentioned_exists():
    texts = tracked_text_files()
    missing = [(rel, line, ref) for rel, line, ref in _hits(texts, _DOCS_PATH)
               if not os.path.exists(os.path.join(ROOT, ref))]
    for rel, text in texts.items():  # relative Markdown links between pages
        if rel.endswith(".md"):
            base = os.path.dirname(rel)
            missing += [(rel, text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _MD_LINK.finditer(text)
                        if not os.path.exists(os.path.join(ROOT, base, m.group(1)))]
    assert not missing, "documentation paths that do not exist:\n" + "\n".join(
        f"  {rel}:{line}: {ref}" for rel, line, ref in missing)
