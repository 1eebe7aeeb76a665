"""The README stays a README: short, every page under docs/ linked from it, every link it makes resolves, and its
usage example runs as written after the main job."""

import os
import re
import subprocess
import sys

import pytest

from .helpers import REPO

README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)#]+)(#[^)]*)?\)")


def test_the_readme_is_short_and_links_every_page_under_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = {match.group(1) for match in LINK.finditer(text)}
    assert all((REPO / link).exists() for link in links), sorted(link for link in links if not (REPO / link).exists())
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert pages <= links, sorted(pages - links)


def test_the_pages_under_docs_link_only_what_exists():
    for page in (REPO / "docs").glob("*.md"):
        for match in LINK.finditer(page.read_text()):
            target = match.group(1)
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists() or (REPO / target).exists(), (page.name, target)


@pytest.mark.slow
def test_the_usage_example_runs_after_the_main_job(quick_demo, tmp_path):
    """The README's first Python block, run as written from a folder where `runs/demo` is the (quick) main job's."""
    out, _, _ = quick_demo
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(out)
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), "the example prints the answer and its boxes"
