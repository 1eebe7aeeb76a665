"""Requests to a SPHINX model served behind an OpenAI-compatible endpoint (`vllm serve`, SGLang).

Serving engines take only `eos_token_id` and the sampling defaults from a folder's `generation_config.json`, not
SPHINX's turn separator or its ban on the `<image>` placeholder, so each request carries what `generate` does on
its own: greedy decoding (`temperature=0`), `stop=["\\n###"]`, and a logit bias of -100 on the `<image>` id.
With those a served answer is `generate`'s answer; `SphinxProcessor.post_process_generation` reads its boxes.

```python
from openai import OpenAI
from transformers import AutoProcessor
from modeling_sphinx.serving.client import chat_request

processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
request = chat_request(folder, image, "Please provide the bounding box ...: the red circle.", processor)
answer = client.chat.completions.create(**request).choices[0].message.content
boxes = processor.post_process_generation(answer, image).boxes
```
"""

import base64
import io

from PIL import Image

from ..processing.tasks_sphinx import SEPARATOR

BANNED = -100  # OpenAI's lowest logit bias: the token is never sampled


def image_url(image: Image.Image) -> str:
    """The image as a PNG data URL, for an `image_url` content part."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_request(model: str, image: Image.Image, question: str, processor, max_tokens: int = 64) -> dict:
    """Keyword arguments of `client.chat.completions.create` that reproduce `generate`'s greedy answer to one
    image question: the image first, as SPHINX's template places it, then the question."""
    content = [{"type": "image_url", "image_url": {"url": image_url(image)}}, {"type": "text", "text": question}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "stop": [SEPARATOR],
        "logit_bias": {str(processor.image_token_id): BANNED},
    }
