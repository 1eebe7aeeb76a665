"""The web app: `sphinx-mllm serve` on 127.0.0.1, driven by `gradio_client` and by headless Chromium.

The served model is the quick demo's trained miniature, which answers grounding instructions with boxes.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from transformers import AutoProcessor

from modeling_sphinx.processing.tasks_sphinx import TASK_INSTRUCTIONS

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(quick_demo, tmp_path_factory):
    """`sphinx-mllm serve` in its own process: `(url, model folder)`."""
    model = quick_demo[0] / "best"
    port = _free_port()
    command = Path(sys.executable).with_name("sphinx-mllm")
    console = tmp_path_factory.mktemp("serve") / "console.txt"
    server = subprocess.Popen(
        [str(command), "serve", str(model), "--port", str(port)],
        stdout=console.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{console.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            pytest.fail("the server did not answer within 180 s")
        time.sleep(0.5)
    yield url, model, console
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def images(quick_demo, tmp_path_factory):
    """A held-out demo image with its referring expression, a text file named `.png`, and a PNG cut short."""
    split = next((quick_demo[0] / "data").glob("real-1???????"))
    row = json.loads((split / "grounding.jsonl").read_text().splitlines()[0])
    good = split / row["image"]
    folder = tmp_path_factory.mktemp("uploads")
    not_an_image = folder / "notes.png"
    not_an_image.write_text("these are notes, not pixels\n")
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    return (good, row["expression"]), not_an_image, truncated


def _question(expression: str) -> str:
    return TASK_INSTRUCTIONS["referring_expression"].format(expression=expression)


def test_answer_endpoint_returns_the_answer_and_its_boxes_in_pixels(served, images):
    url, model, console = served
    # the console says where the app is, in the command's words, not Gradio's advice to Python callers
    deadline = time.monotonic() + 30
    while "serving" not in console.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"serving {model} at http://127.0.0.1:" in console.read_text()
    assert "share=True" not in console.read_text()
    (good, expression), not_an_image, truncated = images
    question = _question(expression)
    client = Client(url, verbose=False, analytics_enabled=False)
    assert "/answer" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    result = client.predict(handle_file(str(good)), question, 24, False, 0.7, 0.9, api_name="/answer")
    width, height = Image.open(good).size
    expected = AutoProcessor.from_pretrained(model).post_process_generation(result["text"], Image.open(good))
    assert result["text"].startswith("[") and result["boxes"], result  # the miniature answers with a box
    assert [item["box"] for item in result["boxes"]] == [[round(v, 1) for v in box] for box in expected.boxes]
    for item in result["boxes"]:
        x1, y1, x2, y2 = item["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height

    for upload, message in ((not_an_image, "is not an image"), (truncated, "is damaged")):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(upload)), question, 24, False, 0.7, 0.9, api_name="/answer")
    again = client.predict(handle_file(str(good)), question, 24, False, 0.7, 0.9, api_name="/answer")
    assert again == result  # greedy, and still serving after the bad uploads


@pytest.mark.browser
def test_the_page_grounds_a_phrase_and_reports_bad_uploads(served, images, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no browser: install Debian's chromium (apt-get install -y chromium) to run this test")
    from playwright.sync_api import expect, sync_playwright

    url, _, _ = served
    (good, expression), not_an_image, truncated = images
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--disable-gpu", "--disable-quic", "--disable-sync"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        outside = []
        page.on("request", lambda request: None if request.url.startswith(url) else outside.append(request.url))
        page.goto(url)
        upload = page.locator("#upload input[type=file]")
        for bad, message in ((not_an_image, "'notes.png' is not an image"), (truncated, "'truncated.png' is damaged")):
            upload.set_input_files(str(bad))
            expect(page.get_by_text(message)).to_be_visible()
            page.get_by_label("Remove Image").click()

        upload.set_input_files(str(good))
        expect(page.locator("#annotated img").first).to_be_visible()
        page.get_by_label("Phrase, category or region").fill(expression)
        page.get_by_role("button", name="Write the instruction").click()
        expect(page.locator("#question textarea")).to_have_value(_question(expression))
        page.locator("#send").click()
        answer = page.locator("#chat").get_by_text("[0.")
        expect(answer).to_be_visible(timeout=60_000)
        expect(page.locator("#annotated").get_by_text("box 1")).to_be_visible()  # the legend of the drawn box
        expect(page.locator("#annotated img")).to_have_count(2)  # the image and the box's layer
        second = TASK_INSTRUCTIONS["vqa_short"].format(question="What colour is the shape?")
        page.locator("#question textarea").fill(second)  # a second turn about the same image
        page.locator("#send").click()
        expect(page.locator("#chat [data-testid=bot]")).to_have_count(2, timeout=60_000)
        screenshot = tmp_path / "serve.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert Image.open(screenshot).size[0] == 1280
    assert not [u for u in outside if not u.startswith(("data:", "blob:"))]  # the page asks nothing of the outside


def test_uploads_are_checked_and_shortcuts_write_the_original_instructions(tmp_path):
    import gradio as gr

    from modeling_sphinx.processing.tasks_sphinx import format_box
    from modeling_sphinx.serving.webapp import MAX_UPLOAD_BYTES, instruction, read_upload

    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 7000)).save(huge)  # small file, 56 megapixels
    with pytest.raises(gr.Error, match=r"'huge.png' is 8000x7000 pixels; the limit is 50 megapixels"):
        read_upload(str(huge))
    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(gr.Error, match=r"'heavy.png' is 25.0 MiB; the limit is 25 MiB"):
        read_upload({"path": str(heavy), "orig_name": "heavy.png"})
    with pytest.raises(gr.Error, match="Upload an image first"):
        read_upload(None)

    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), "white").save(photo)
    upload = {"path": str(photo), "orig_name": "photo.png"}
    assert instruction("Describe the image", "", upload) == TASK_INSTRUCTIONS["detailed_caption"]
    assert instruction("Detect a category", " dog ", upload) == TASK_INSTRUCTIONS["detection"].format(category="dog")
    region = instruction("Caption a region", "[30, 40, 150, 160]", upload)
    assert region == TASK_INSTRUCTIONS["region_caption"].format(box=format_box([30, 40, 150, 160], (200, 300)))
    with pytest.raises(gr.Error, match="x1,y1,x2,y2 in pixels"):
        instruction("Caption a region", "150,40,30,160", upload)
    with pytest.raises(gr.Error, match="Ground a phrase needs the phrase to ground"):
        instruction("Ground a phrase", "  ", upload)
