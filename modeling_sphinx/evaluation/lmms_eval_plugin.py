"""SPHINX as an lmms-eval chat model: `lmms-eval --model sphinx --model_args pretrained=PATH,...`.

Registered through the `lmms_eval.models` entry point (`manifest`); needs the `eval` extra
(`pip install -e ".[eval]"`). What the generic `huggingface` wrapper would get wrong for SPHINX, and this one does:
- answers stop at SPHINX's turn separator `\\n###` as well as at the task's `until` strings;
- for the `refcoco*_bbox_rec*` tasks the prompt is SPHINX's own grounding instruction and the answer box is
  mapped from fractions of the padded square to fractions of the original image, which those tasks score;
- it loads `AutoModelForImageTextToText` (the generic wrapper falls back to `AutoModel`, which cannot generate),
  on the CPU or a GPU, and batches requests (greedy answers are the same batched or one at a time).

`rec_doc_to_text` is SPHINX's REC prompt for local task YAMLs (`recipes/eval/`).
"""

import re

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages

from ..inference import generate_answers, load_pretrained
from ..processing.tasks_sphinx import SEPARATOR, TASK_INSTRUCTIONS

REC_TASK = re.compile(r"refcoco.*_bbox_rec")


def rec_doc_to_text(doc: dict) -> str:
    """SPHINX's referring-expression instruction for an lmms-eval RefCOCO document (expression in `answer`)."""
    return TASK_INSTRUCTIONS["referring_expression"].format(expression=str(doc["answer"]).rstrip("."))


def unpad_boxes(answer: str, image_size: tuple[int, int], post_process) -> str:
    """Rewrite the boxes of an answer from padded-square fractions to fractions of the `(height, width)` image."""
    height, width = image_size
    grounded = post_process(answer, image_sizes=image_size)
    if not grounded.boxes:
        return answer
    x1, y1, x2, y2 = grounded.boxes[0]
    return f"[{x1 / width:.4f}, {y1 / height:.4f}, {x2 / width:.4f}, {y2 / height:.4f}]"


def _cut_at(text: str, stops: list[str]) -> str:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(positions)] if positions else text


class SphinxLMMS(lmms):
    """lmms-eval chat model around a SPHINX folder or Hub id."""

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        dtype: str = "auto",
        max_new_tokens: int = 64,
        trust_remote_code: bool = False,
        **kwargs,
    ):
        super().__init__()
        self.device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.processor, self.model = load_pretrained(pretrained, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device_name)

    def _prepare(self, request: Instance):
        _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        messages = ChatMessages(messages=doc_to_messages(doc)).to_hf_messages()
        images = [part["image"] for message in messages for part in message["content"] if part["type"] == "image"]
        rec = bool(REC_TASK.search(task))
        if rec:  # SPHINX's own instruction, with the expression the task asks about
            for message in messages:
                for part in message["content"]:
                    if part["type"] == "text":
                        part["text"] = rec_doc_to_text(doc)
        return messages, images, dict(gen_kwargs or {}), rec

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            prepared = [self._prepare(r) for r in requests[start : start + self.batch_size_per_gpu]]
            max_new_tokens = int(prepared[0][2].get("max_new_tokens", self.max_new_tokens))
            texts = generate_answers(
                self.model,
                self.processor,
                [messages for messages, _, _, _ in prepared],
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            for text, (_, images, kwargs, rec) in zip(texts, prepared, strict=True):
                until = kwargs.get("until") or []
                text = _cut_at(text, [*([until] if isinstance(until, str) else until), SEPARATOR]).strip()
                if rec and images:
                    text = unpad_boxes(
                        text, (images[0].height, images[0].width), self.processor.post_process_generation
                    )
                answers.append(text)
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("the SPHINX lmms-eval model is a chat model: it runs generation tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the SPHINX lmms-eval model answers single-round requests")


def manifest() -> ModelManifest:
    return ModelManifest(model_id="sphinx", chat_class_path="modeling_sphinx.evaluation.lmms_eval_plugin.SphinxLMMS")


__all__ = ["SphinxLMMS", "manifest", "rec_doc_to_text", "unpad_boxes"]
