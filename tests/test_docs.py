"""docs/paper.md is what the code cites; the repository is self-contained.

Every citation of the paper reference in code, configs and docs (the file name followed by one or more
section marks, e.g. "(paper.md §4, §6, §8)", "§4 Fig. 4, §8" or a range "§4-§5") must name a section that
docs/paper.md has as a heading "## N. Title". No file may point outside the repository at the shared
reference folder. Pure file reading, no torch: fast.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "docs" / "paper.md"
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".cfg", ".toml"}
NAMES = {"Makefile"}
SKIP_DIRS = {".venv", "venv", "results", "runs", "build", "dist", ".git", "__pycache__", ".pytest_cache"}
OUTSIDE = "shared" + "/reference"          # split so that this file does not match itself

HEADING = re.compile(r"^## (\d+)\. \S.*$", re.MULTILINE)
# The clause after the file name, up to the first ")", "]", ";", ":" or line end: "§4, §6, §8", "§4 Fig. 4, §8".
CITATION = re.compile(r"paper\.md\b([^)\];:\n]*)")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")     # "4.2" is kept whole, so a sub-section that is no heading fails
BARE_MARK = re.compile(r"§(?!\s*\d)")             # "§" with no number: a broken citation
RANGE = re.compile(r"§\s*(\d+)(?:\s*[-–]\s*§\s*|[-–])(\d+)")   # "§4-§5", "§4 – §6", "§4-5"


def repository_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (so a new file is checked before its commit)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: git ls-files is needed to list the repository's files")
    files = []
    for name in sorted(set(out.decode("utf-8", "surrogateescape").split("\0")) - {""}):
        parts = Path(name).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        path = ROOT / name
        if path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def source_files() -> list[Path]:
    return [p for p in repository_files() if p.suffix in SUFFIXES or p.name in NAMES]


def headings() -> list[str]:
    return HEADING.findall(PAPER.read_text(encoding="utf-8"))


def cited_sections(clause: str) -> list[str] | None:
    """The sections one citation clause names, ranges expanded; None for a clause with a mark but no number."""
    if BARE_MARK.search(clause):
        return None
    sections = SECTION.findall(clause)
    for low, high in RANGE.findall(clause):
        sections += [str(n) for n in range(int(low), int(high) + 1)]
    return sections


def citations() -> list[tuple[str, str, list[str] | None]]:
    """(file:line, the citation as written, its sections) for every citation of the paper reference."""
    found = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for match in CITATION.finditer(line):
                clause = match.group(1)
                if "§" in clause:
                    found.append((f"{path.relative_to(ROOT)}:{number}", match.group(0).strip(),
                                  cited_sections(clause)))
    return found


def test_paper_reference_numbers_its_sections_one_to_n():
    numbers = headings()
    assert numbers, f"{PAPER.relative_to(ROOT)} has no section headings of the form '## 1. Title'"
    assert numbers == [str(n) for n in range(1, len(numbers) + 1)], (
        f"{PAPER.relative_to(ROOT)}: section headings must be '## 1. ...', '## 2. ...', ... in order, got {numbers}")


def test_every_paper_citation_names_an_existing_section():
    sections = set(headings())
    found = citations()
    assert found, "no citation of docs/paper.md found: the file list or the pattern is broken"
    bad = [f"{where}: '{text}' " + ("has a § without a number" if names is None else
                                    f"cites §{', §'.join(n for n in names if n not in sections)}")
           for where, text, names in found if names is None or not set(names) <= sections]
    assert not bad, (f"{len(bad)} citation(s) of sections docs/paper.md does not have (its sections: "
                     f"{', '.join(sorted(sections, key=int))}):\n" + "\n".join(bad))


def test_no_file_points_outside_the_repository():
    needle = OUTSIDE.encode()
    bad = []
    for path in repository_files():
        data = path.read_bytes()
        if needle in data:
            bad += [f"{path.relative_to(ROOT)}:{number}: {line.strip()[:160]}"
                    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1)
                    if OUTSIDE in line]
    assert not bad, (f"{len(bad)} line(s) mention {OUTSIDE}, which is not part of the repository; cite "
                     f"docs/paper.md (or say it in place) instead:\n" + "\n".join(bad))
