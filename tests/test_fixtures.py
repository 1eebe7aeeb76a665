"""The repository is self-contained: its fixtures are intact and nothing it tracks reads outside of it."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from .helpers import FIXTURES, IMAGES, PARITY

REPO = Path(__file__).resolve().parents[1]
PARITY_FIXTURES = ["llama_ens", "llama_ens5", "llama_ens5_light"]
# Folders that a checkout grows by use and never tracks (see .gitignore).
UNTRACKED_DIRS = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}

# The team's `shared/` folder named as a path part: it sits beside our checkouts, never in a clone.
SHARED_FOLDER = re.compile(r"""[/\\]\s*["']shared["']|["']shared[/\\]|\.\.[/\\]shared\b""")
# A relative path that climbs with `../` steps (resolved from the file's own folder, as the recipes' paths are).
PARENT_STEPS = re.compile(r"""(?:^|(?<=[\s"'`(=:]))((?:\.\.[/\\])+)""", re.MULTILINE)
# `Path(__file__)` followed by `.parent` / `.parents[k]` steps: how far up from the file it climbs.
FILE_CLIMB = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent(?!s)|\.parents\[\d+\])+)")


def tracked_files() -> list[Path]:
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
        ).stdout.split("\0")
        return [REPO / name for name in listing if name]
    except (OSError, subprocess.CalledProcessError):  # an unpacked archive rather than a clone
        return [
            p
            for p in REPO.rglob("*")
            if p.is_file() and not UNTRACKED_DIRS & set(p.relative_to(REPO).parts) and ".egg-info" not in str(p)
        ]


def references_outside(relative: Path, text: str) -> list[str]:
    """The places in one file's text that point outside the repository, as `line: excerpt`."""
    levels_to_root = len(relative.parts) - 1  # how many `..` steps from the file's folder reach the root
    found = list(SHARED_FOLDER.finditer(text))
    found += [m for m in PARENT_STEPS.finditer(text) if m.group(1).count("..") > levels_to_root]
    for match in FILE_CLIMB.finditer(text):
        steps = re.findall(r"\.parent(?!s)|\.parents\[(\d+)\]", match.group(1))
        if sum(int(k) + 1 if k else 1 for k in steps) > levels_to_root + 1:  # Path(__file__).parent: 1 step
            found.append(match)
    return [f"{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()}" for m in found]


def test_no_tracked_file_refers_outside_the_repository():
    offenders = {}
    for path in tracked_files():
        relative = path.relative_to(REPO)
        if relative.parts[:2] == ("tests", "fixtures") and path.suffix != ".md":
            continue  # recorded data, not code or docs
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        if places := references_outside(relative, text):
            offenders[str(relative)] = places
    assert not offenders, f"files that read outside the repository: {json.dumps(offenders, indent=1)}"


# The examples are assembled from these pieces so that this file, which the scan above reads too, holds none of
# the references it refuses.
FILE, TEAM, UP = "Path(__file__)", "shared", "../"


@pytest.mark.parametrize(
    ("relative", "text"),
    [
        ("tests/conftest.py", f'SHARED = {FILE}.resolve().parents[1].parent / "{TEAM}"'),
        ("benchmarks/bench.py", f'FIXTURES = {FILE}.resolve().parents[2] / "{TEAM}" / "fixtures"'),
        ("tests/test_x.py", f'ROOT = {FILE}.parent.parent.parent / "data"'),
        ("README.md", f"Copy the images from {UP}{TEAM}/fixtures/images first."),
        ("modeling_sphinx/x.py", f'open("{UP * 2}weights.bin")'),
        ("recipes/mix/x.yaml", f"base_model: {UP * 3}runs/real"),
    ],
)
def test_outside_references_are_caught(relative, text):
    assert references_outside(Path(relative), text), text


@pytest.mark.parametrize(
    ("relative", "text"),
    [
        ("tests/conftest.py", f'FIXTURES = {FILE}.resolve().parent / "fixtures"'),
        ("tests/test_sft.py", f"REPO = {FILE}.resolve().parents[1]"),
        ("README.md", "a shared base on both domains; the shared/exclusive split"),
        ("recipes/mix/x.yaml", f"base_model: {UP * 2}runs/real"),
        ("recipes/README.md", f"see [the main README]({UP}README.md)"),
    ],
)
def test_paths_inside_the_repository_pass(relative, text):
    assert not references_outside(Path(relative), text), text


@pytest.mark.parametrize("fixture", PARITY_FIXTURES)
def test_parity_fixture_files_match_their_manifest(fixture):
    folder = PARITY / fixture
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"manifest.json", "README.md"}
    assert present == set(listed), f"{folder}: files not in the manifest or missing from the folder"
    for name, record in listed.items():
        data = (folder / name).read_bytes()
        assert len(data) == record["bytes"], f"{folder / name}: {len(data)} bytes, manifest says {record['bytes']}"
        assert hashlib.sha256(data).hexdigest() == record["sha256"], f"{folder / name}: SHA-256 differs from manifest"


def test_every_fixture_folder_is_described():
    for folder in (FIXTURES, IMAGES, PARITY):
        assert (folder / "README.md").is_file(), folder
    described = (IMAGES / "README.md").read_text()
    for image in sorted(p.name for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg")):
        assert f"`{image}`" in described, f"{image} has no provenance row in {IMAGES / 'README.md'}"
