"""`sphinx-mllm serve`: chat with a SPHINX model about an image in the browser, with its boxes and points drawn.

A Gradio app (the `demo` extra: `pip install "sphinx-mllm[demo]"`): upload an image, pick a task shortcut that
writes SPHINX's own instruction (describe, ground a phrase, detect a category, caption a region clicked or typed
on the image, OCR) or type freely, and read the streamed answer beside the image annotated with what it grounds.
The conversation is multi-turn in SPHINX's template; a new image starts a new one.

Two endpoints: the page's chat, and `/answer` for programs (one question about one image; returns the answer and
its boxes and points in pixels of the uploaded image), e.g. with `gradio_client`::

    Client("http://127.0.0.1:7860/").predict(handle_file("cat.png"), "Detect all cat shown in the image.",
                                             256, False, 0.7, 0.9, api_name="/answer")

Nothing leaves the machine: Gradio's analytics and version check are off, and its theme uses local fonts.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

from ..inference import Chat, read_answer, sampling_settings  # noqa: E402
from ..processing.tasks_sphinx import TASK_INSTRUCTIONS, format_box  # noqa: E402
from ..records import DataError, image_size, open_image  # noqa: E402

MAX_UPLOAD_BYTES = 25 * 1024**2
MAX_UPLOAD_PIXELS = 50_000_000

# shortcut label → (SPHINX task, what the argument box holds, or None)
SHORTCUTS = {
    "Describe the image": ("detailed_caption", None),
    "Ground a phrase": ("referring_expression", "expression"),
    "Detect a category": ("detection", "category"),
    "Caption a region": ("region_caption", "box"),
    "Read the text (OCR)": ("text_detection", None),
}
ARGUMENT_HINTS = {
    "expression": "the phrase to ground, e.g. the man in a red hat",
    "category": "the category to detect, e.g. dog",
    "box": "x1,y1,x2,y2 in pixels, or click two opposite corners on the image",
}
POINT_HALF_SIDE = 4  # points are drawn as small squares, since the annotated image draws boxes and masks


def read_upload(upload) -> PIL.Image.Image:
    """The uploaded image as RGB, or a `gr.Error` that says what is wrong with the upload.

    `upload` is what Gradio sends before preprocessing (a file-data dict) or a path; it is checked here rather
    than by Gradio's image preprocessing so that a bad file gets a message naming it, not a decoder traceback.
    """
    if not upload:
        raise gr.Error("Upload an image first.")
    path = upload if isinstance(upload, str) else upload.get("path")
    original_name = upload.get("orig_name") if isinstance(upload, dict) else None
    name = Path(original_name or path or "upload").name
    if path is None or not os.path.isfile(path):
        raise gr.Error(f"The upload {name!r} did not arrive; upload it again.")
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise gr.Error(f"{name!r} is {size / 1024**2:.1f} MiB; the limit is {MAX_UPLOAD_BYTES / 1024**2:.0f} MiB.")
    try:
        height, width = image_size(path)
    except DataError:
        raise gr.Error(f"{name!r} is not an image that can be read (PNG, JPEG, WebP, ...).") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise gr.Error(f"{name!r} is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels.")
    try:
        return open_image(path)
    except ValueError:
        raise gr.Error(f"{name!r} is damaged: its image data is truncated or corrupt.") from None


def parse_pixel_box(text: str) -> list[float]:
    try:
        box = [float(value) for value in text.replace("[", "").replace("]", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]:
        raise gr.Error(f"A region is x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2, got {text!r}.")
    return box


def instruction(shortcut: str, argument: str, upload) -> str:
    """The original's instruction for a shortcut, with its phrase, category or region filled in."""
    task, field = SHORTCUTS[shortcut]
    if field is None:
        return TASK_INSTRUCTIONS[task]
    if not argument.strip():
        raise gr.Error(f"{shortcut} needs {ARGUMENT_HINTS[field]}.")
    if field == "box":
        image = read_upload(upload)
        value = format_box(parse_pixel_box(argument), (image.height, image.width))
    else:
        value = argument.strip()
    return TASK_INSTRUCTIONS[task].format(**{field: value})


def annotations(processor, text: str, image: PIL.Image.Image) -> dict:
    """The boxes and points of an answer in pixels of `image`, each with its phrase (or its number)."""
    grounded = read_answer(processor, text, image)
    boxes, points = [], []
    for entity in grounded.entities:
        for box in entity.boxes:
            boxes.append({"label": entity.phrase or f"box {len(boxes) + 1}", "box": [round(v, 1) for v in box]})
        for point in entity.points:
            points.append(
                {"label": entity.phrase or f"point {len(points) + 1}", "point": [round(v, 1) for v in point]}
            )
    return {"boxes": boxes, "points": points}


def transcript(messages: list[dict]) -> list[dict]:
    """The chatbot's view of a SPHINX conversation: each turn's text."""
    return [
        {"role": m["role"], "content": "\n".join(c["text"] for c in m["content"] if c["type"] == "text")}
        for m in messages
    ]


def annotated_image(image: PIL.Image.Image, found: dict):
    """The value of a `gr.AnnotatedImage`: the image and integer pixel boxes (points as small squares)."""
    regions = [(tuple(int(round(v)) for v in item["box"]), item["label"]) for item in found["boxes"]]
    for item in found["points"]:
        x, y = (int(round(v)) for v in item["point"])
        square = (x - POINT_HALF_SIDE, y - POINT_HALF_SIDE, x + POINT_HALF_SIDE, y + POINT_HALF_SIDE)
        regions.append((square, item["label"]))
    return np.asarray(image), regions


def stream_answer(chat: Chat, question: str, max_new_tokens, sampling, temperature, top_p):
    """The answer to `question` in `chat` as it grows; a failed generation becomes a message on the page."""
    settings = {"max_new_tokens": int(max_new_tokens), **sampling_settings(sampling, temperature, top_p)}
    try:
        yield from chat.stream(question, **settings)
    except Exception as error:
        raise gr.Error(f"Generation failed: {error}") from None


def answer_one(
    model, processor, upload, question: str, max_new_tokens=256, sampling=False, temperature=0.7, top_p=0.9
):
    """One question about one image: `{"text", "boxes": [{"label", "box"}], "points": [{"label", "point"}]}`."""
    image = read_upload(upload)
    if not question or not question.strip():
        raise gr.Error("Ask a question.")
    chat = Chat(model, processor, image, reuse_cache=False)
    *_, text = stream_answer(chat, question, max_new_tokens, sampling, temperature, top_p)
    return {"text": text, **annotations(processor, text, image)}


def build_app(model, processor, title: str = "SPHINX") -> gr.Blocks:
    """The Gradio app for `model`; launch it with `.queue().launch(...)`.

    Each browser session keeps its conversation as a `Chat`, whose KV cache makes a follow-up question cost its
    own tokens only; a new image, or "New conversation", starts a new one."""
    model.eval()

    def new_image(upload):
        image = read_upload(upload)
        return (np.asarray(image), []), [], None, []

    def clear():
        return None, [], None, [], ""

    def respond(upload, question, chat, max_new_tokens, sampling, temperature, top_p):
        image = read_upload(upload)
        if not question.strip():
            raise gr.Error("Type a question or pick a task shortcut.")
        chat = chat or Chat(model, processor, image)
        shown = [*transcript(chat.messages), {"role": "user", "content": question}]
        text = ""
        for text in stream_answer(chat, question, max_new_tokens, sampling, temperature, top_p):
            yield [*shown, {"role": "assistant", "content": text}], chat, gr.skip(), ""
        yield transcript(chat.messages), chat, annotated_image(image, annotations(processor, text, image)), ""

    def answer(upload, question, max_new_tokens, sampling, temperature, top_p):
        return answer_one(model, processor, upload, question, max_new_tokens, sampling, temperature, top_p)

    def pick_corner(corners, event: gr.SelectData):
        corners = [*corners, [int(v) for v in event.index]][-2:]
        if len(corners) < 2:
            return corners, gr.skip(), gr.skip()
        (x1, y1), (x2, y2) = corners
        box = f"{min(x1, x2)},{min(y1, y2)},{max(x1, x2)},{max(y1, y2)}"
        return [], "Caption a region", box

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nUpload an image, then ask about it or pick a task. Boxes in the answer are drawn.")
        conversation_state = gr.State(None)  # the session's Chat
        corners = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="upload", height=300)
                with gr.Group():
                    shortcut = gr.Dropdown(list(SHORTCUTS), value="Ground a phrase", label="Task")
                    argument = gr.Textbox(
                        label="Phrase, category or region", placeholder=" | ".join(ARGUMENT_HINTS.values())
                    )
                    use = gr.Button("Write the instruction")
                with gr.Accordion("Generation", open=False):
                    max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                    sampling = gr.Checkbox(value=False, label="Sample (otherwise greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
            with gr.Column(scale=2):
                annotated = gr.AnnotatedImage(label="Answer on the image", elem_id="annotated", height=360)
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=320)
                question = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("New conversation")
                api_result = gr.JSON(visible=False, label="answer")
                api_trigger = gr.Button(visible=False)

        conversation = [chatbot, conversation_state, annotated, question]
        settings = [max_new_tokens, sampling, temperature, top_p]
        image.upload(
            new_image,
            image,
            [annotated, chatbot, conversation_state, corners],
            preprocess=False,
            api_visibility="private",
        )
        image.clear(clear, None, [annotated, chatbot, conversation_state, corners, argument], api_visibility="private")
        image.select(pick_corner, corners, [corners, shortcut, argument], api_visibility="private")
        use.click(instruction, [shortcut, argument, image], question, preprocess=False, api_visibility="private")
        for trigger in (send.click, question.submit):
            trigger(
                respond,
                [image, question, conversation_state, *settings],
                conversation,
                preprocess=False,
                api_visibility="private",
            )
        reset.click(
            lambda: ([], None, gr.skip()), None, [chatbot, conversation_state, annotated], api_visibility="private"
        )
        api_trigger.click(answer, [image, question, *settings], api_result, preprocess=False, api_name="answer")
    return app
