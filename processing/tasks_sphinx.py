"""SPHINX's conversation format, task instructions, and the box/keypoint text format.

The strings are the original's, byte for byte (LLaMA2-Accessory `conv_v1_2` and the SPHINX demo/eval prompts).
Coordinates in SPHINX text are fractions in [0, 1] of the image padded to a centred square; `to_pixels` and
`format_box` convert between that and pixels of the original image.

This file is copied flat into saved model folders as remote code (the processor imports it).
"""

import re
from dataclasses import dataclass, field

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SEPARATOR = "\n###"

# Every image of a conversation goes right after BOS, before the system prompt, as in the original, whatever
# the position of the image blocks in the messages. The assistant text sits between generation markers so that
# `return_assistant_tokens_mask` (TRL's assistant_only_loss) supervises exactly what the original supervised:
# " {answer}\n###".
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system + '\\n\\n###' -}}"
    "{%- for message in turns -%}"
    "{%- set text = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' Human: ' + text + '\\n###' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' Assistant:' -}}{%- generation -%}{{- ' ' + text + '\\n###' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('SPHINX conversations have user and assistant turns (and one leading system message), "
    "got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' Assistant:' -}}{%- endif -%}"
)

# Task instructions: `{}` fields are filled by `TASK_INSTRUCTIONS[task].format(...)`.
TASK_INSTRUCTIONS: dict[str, str] = {
    "vqa_short": "{question}\nAnswer the question using a single word or phrase.",
    "vqa_vizwiz": (
        "{question} When the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    ),
    "referring_expression": "Please provide the bounding box coordinate of the region this sentence describes: {expression}.",
    "region_caption": "Please provide a short description for this region: {box}",
    "detailed_caption": "Generate a detailed description about the image.",
    "short_caption": "Provide a one-sentence caption for the provided image.",
    "grounded_caption": "Describe the image concisely. Include the bounding box for each mentioned object.",
    "detection": "Detect all {category} shown in the image.",
    "keypoints": "Detect the key points of the person in the region {box}.",
    "text_detection": "Please detect all texts and provide their bounding box coordinate.",
    "chart_to_table": "Convert this chart to a table.",
    "general_qa": "What's in the image?",
}

GENERIC_FIELD = "{content}"


def task_prompt(instruction: str, template: str | None = None, **fields) -> str:
    """The prompt of a task: `TASK_INSTRUCTIONS[instruction]` filled with `fields`, or, given a `template` (one
    instruction for every task, with a `{content}` field), that template filled with the task's fields joined by
    spaces. The template is what an ablation of the task-specific instructions trains and evaluates with."""
    if template is None:
        return TASK_INSTRUCTIONS[instruction].format(**fields)
    return template.format(content=" ".join(str(value) for value in fields.values()))


def check_prompt_template(template: str) -> str:
    """`template` if it is one instruction with a single `{content}` field, else a ValueError naming the problem."""
    if not isinstance(template, str) or GENERIC_FIELD not in template:
        raise ValueError(f"a prompt template is a string with a {GENERIC_FIELD} field, got {template!r}")
    try:
        template.format(content="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"prompt template {template!r}: only {GENERIC_FIELD} may be a field ({error!r})") from None
    return template


# COCO-17 joints in COCO's order, named as the SPHINX demo draws them.
COCO_KEYPOINTS = (
    "nose",
    "left eye",
    "right eye",
    "left ear",
    "right ear",
    "left shoulder",
    "right shoulder",
    "left elbow",
    "right elbow",
    "left wrist",
    "right wrist",
    "left hip",
    "right hip",
    "left knee",
    "right knee",
    "left ankle",
    "right ankle",
)

_NUMBER = r"\d+(?:\.\d+)?"
_BRACKET = re.compile(r"\[([\d.,;\s]*)\]")
_PHRASE = re.compile(r"<p>(.*?)</p>\s*(\[[\d.,;\s]*\])")


@dataclass
class GroundedEntity:
    """A phrase (or `None` for a bare coordinate list) with its boxes and points in image pixels."""

    phrase: str | None
    boxes: list[list[float]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)


@dataclass
class GroundedText:
    """`text`: the answer with `<p>` tags removed; `entities`: every coordinate list, in order."""

    text: str
    entities: list[GroundedEntity]

    @property
    def boxes(self) -> list[list[float]]:
        return [box for entity in self.entities for box in entity.boxes]

    @property
    def points(self) -> list[list[float]]:
        return [point for entity in self.entities for point in entity.points]


def _padding(image_size: tuple[int, int]) -> tuple[int, int, int]:
    height, width = image_size
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive (height, width), got {image_size}")
    side = max(height, width)
    return side, (side - width) // 2, (side - height) // 2


def to_pixels(values: list[float], image_size: tuple[int, int]) -> list[float]:
    """[0, 1] coordinates of the padded square (x, y pairs) → pixels of the `(height, width)` image, clipped."""
    side, x_offset, y_offset = _padding(image_size)
    height, width = image_size
    out = []
    for i, value in enumerate(values):
        if i % 2 == 0:
            out.append(min(max(value * side - x_offset, 0.0), float(width)))
        else:
            out.append(min(max(value * side - y_offset, 0.0), float(height)))
    return out


def _coordinate_list(groups: list[list[float]], image_size: tuple[int, int], decimals: int) -> str:
    """Pixel (x, y, ...) groups → `[a,b,...;c,d,...]` in fractions of the padded square."""
    side, x_offset, y_offset = _padding(image_size)

    def fractions(values):
        return ",".join(
            f"{(v + (x_offset if i % 2 == 0 else y_offset)) / side:.{decimals}f}" for i, v in enumerate(values)
        )

    return "[" + ";".join(fractions(group) for group in groups) + "]"


def format_box(box: list[float], image_size: tuple[int, int], decimals: int = 2) -> str:
    """Pixels `[x1, y1, x2, y2]` of the `(height, width)` image → SPHINX text, e.g. `[0.12,0.30,0.56,0.91]`."""
    return _coordinate_list([box], image_size, decimals)


def format_boxes(boxes: list[list[float]], image_size: tuple[int, int], decimals: int = 2) -> str:
    """Several pixel boxes as one SPHINX list, `;` between boxes: `[0.10,0.20,0.30,0.40;0.50,0.50,0.70,0.90]`."""
    if not boxes:
        raise ValueError("format_boxes needs at least one box")
    return _coordinate_list(boxes, image_size, decimals)


def format_point(point: list[float], image_size: tuple[int, int], decimals: int = 2) -> str:
    """A pixel point `[x, y]` → `[0.25,0.50]`."""
    return _coordinate_list([point], image_size, decimals)


def format_grounded(
    phrases: list[tuple[str, list[list[float]]]], image_size: tuple[int, int], decimals: int = 2
) -> str:
    """Phrases with their pixel boxes → `<p>a dog</p>[...], <p>two cats</p>[...;...]`."""
    return ", ".join(f"<p>{phrase}</p>{format_boxes(boxes, image_size, decimals)}" for phrase, boxes in phrases)


def format_keypoints(keypoints: list[float], image_size: tuple[int, int], decimals: int = 2) -> str:
    """COCO keypoints (17 `x, y, v` triplets, flat as in COCO files) → `<p>nose</p>[x,y], <p>left eye</p>[x,y], ...`.

    Only labelled keypoints (`v > 0`) are written, named in COCO-17 order, so the parse gives each its name.
    """
    if len(keypoints) != 3 * len(COCO_KEYPOINTS):
        raise ValueError(
            f"COCO keypoints are {3 * len(COCO_KEYPOINTS)} numbers (x, y, v per joint), got {len(keypoints)}"
        )
    named = [
        f"<p>{name}</p>{format_point(keypoints[3 * i : 3 * i + 2], image_size, decimals)}"
        for i, name in enumerate(COCO_KEYPOINTS)
        if keypoints[3 * i + 2] > 0
    ]
    return ", ".join(named)


def _parse_groups(bracket_body: str, image_size: tuple[int, int]) -> tuple[list, list]:
    boxes, points = [], []
    for group in bracket_body.split(";"):
        numbers = [float(n) for n in re.findall(_NUMBER, group)]
        if len(numbers) == 4:
            boxes.append(to_pixels(numbers, image_size))
        elif len(numbers) == 2:
            points.append(to_pixels(numbers, image_size))
    return boxes, points


def parse_grounding(text: str, image_size: tuple[int, int]) -> GroundedText:
    """Parse `<p>phrase</p>[x1,y1,x2,y2;…]` and bare `[…]` lists of a SPHINX answer into pixel coordinates."""
    phrase_by_bracket = {m.start(2): m.group(1) for m in _PHRASE.finditer(text)}
    entities = []
    for match in _BRACKET.finditer(text):
        boxes, points = _parse_groups(match.group(1), image_size)
        if boxes or points:
            entities.append(GroundedEntity(phrase_by_bracket.get(match.start()), boxes, points))
    return GroundedText(text=re.sub(r"</?p>", "", text), entities=entities)


def strip_separator(text: str) -> str:
    """Remove the trailing turn separator (and what the stop left after it) from a decoded answer."""
    trimmed = text.rstrip()
    return trimmed[: -len(SEPARATOR)].rstrip() if trimmed.endswith(SEPARATOR) else text


__all__ = [
    "SYSTEM_PROMPT",
    "SEPARATOR",
    "CHAT_TEMPLATE",
    "TASK_INSTRUCTIONS",
    "task_prompt",
    "check_prompt_template",
    "GroundedEntity",
    "GroundedText",
    "COCO_KEYPOINTS",
    "to_pixels",
    "format_box",
    "format_boxes",
    "format_point",
    "format_grounded",
    "format_keypoints",
    "parse_grounding",
    "strip_separator",
]
