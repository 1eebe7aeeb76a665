"""The README stays a README: short, every page under docs/ linked from it, every link it makes resolves; its usage
example and the inference page's run as written after the main job, and so does the example of the model card
every saved folder carries."""

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
@pytest.mark.parametrize("page", ["README.md", "docs/inference.md"])
def test_the_usage_examples_run_after_the_main_job(quick_demo, tmp_path, page):
    """The first Python block of the README and of the inference page, run as written from a folder whose
    `runs/demo` holds the (quick) main job's model and data."""
    out, _, _ = quick_demo
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    for name in ("best", "data"):
        (tmp_path / "runs" / "demo" / name).symlink_to(out / name)
    run = run_first_python_block((REPO / page).read_text(), tmp_path)
    if page == "README.md":
        assert run.stdout.strip(), "the example prints the answer and its boxes"
    else:
        assert (tmp_path / "runs" / "demo" / "answer.png").is_file()


@pytest.mark.slow
def test_the_model_cards_example_runs_as_written(quick_demo, tmp_path):
    """The `Use` block of the card rendered into every saved folder, for the main job's model as if it were on the
    Hub under its folder's path (remote code, no package import), beside a `photo.jpg`."""
    from PIL import Image

    from modeling_sphinx.folder.card import read_card_facts, render_model_card

    out, _, _ = quick_demo
    best = out / "best"
    provenance, facts = read_card_facts(best)
    card = render_model_card(best, provenance, repo_id=str(best), **facts)
    Image.open(out / "data/real-10000000/images/10000000.png").convert("RGB").save(tmp_path / "photo.jpg")
    run = run_first_python_block(str(card), tmp_path)
    assert run.stdout.count("\n") >= 2, run.stdout  # the answer with its boxes, then the pipeline's answer


def run_first_python_block(markdown: str, cwd) -> subprocess.CompletedProcess:
    example = re.search(r"```python\n(.*?)```", markdown, re.S).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run
