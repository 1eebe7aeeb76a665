"""Multi-task instruction data for SPHINX in TRL's vision format, built with `datasets`.

Every sample is `{"messages": [...], "images": [path], "task": str, "id": "source#record"}`: the first user
turn carries one `{"type": "image"}` part, each turn's text is the task's original instruction
(`TASK_INSTRUCTIONS`), and answers use SPHINX's coordinate text (fractions of the image padded to a square,
2 decimals, `;` between boxes, `<p>phrase</p>` before a phrase's boxes), the exact inverse of
`SphinxProcessor.post_process_generation`.

Builders read the formats people have on disk (`TASK_BUILDERS`):

| task | file | record |
|---|---|---|
| `conversations` | LLaVA/SPHINX JSON or JSONL | `{"image", "conversations": [{"from": "human"/"gpt", "value"}]}` |
| `vqa` | JSON, JSONL, CSV or Parquet rows | `image`, `question`, `answer` or VQAv2's `answers` (the most given is the target; optional `instruction`: `vqa_vizwiz`) |
| `detection` | COCO instances JSON | one sample per image and category: all its boxes |
| `grounded_caption` | COCO instances JSON | every category of the image with its boxes |
| `keypoints` | COCO person keypoints JSON | one sample per annotated person |
| `referring_expression` | rows | `image`, `expression` (or `sentences`), `box` `[x1,y1,x2,y2]` or COCO `bbox` |
| `region_caption` | rows | the same records, box in the prompt, expression as the answer |
| `text_detection` | rows | `image`, `texts: [{"text", "box"}]` |
| `chart_to_table` | rows | `image`, `table` |

`load_mixture` reads a YAML task mixture (sources, tasks, sampling weights) into one dataset with
`interleave_datasets`: memory-mapped Arrow by default, `streaming=True` for sets too large to prepare.
Bad data raises a `DataError` naming the file and the record.
"""

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from huggingface_hub.dataclasses import strict

from ..processing.tasks_sphinx import (
    check_prompt_template,
    format_box,
    format_boxes,
    format_grounded,
    format_keypoints,
    task_prompt,
)
from ..records import DataError, image_file, pixel_box, read_rows, record_box, vqa_answers
from ..schema import read, read_yaml_file, ruled


@dataclass
class Source:
    """One entry of a task mixture: where the records are and how often to sample them."""

    path: Path
    task: str
    image_root: Path | None = None
    weight: float = 1.0
    name: str | None = None
    options: dict = field(default_factory=dict)

    def label(self) -> str:
        return self.name or self.path.name


MIXTURE_SHAPE = "a mixture is a mapping with 'sources' (and 'seed')"


def sample(image: Path, turns: list[tuple[str, str]], task: str, record_id: str) -> dict:
    """A TRL conversational vision sample: the image in the first user turn, then the turns in order."""
    messages = []
    for index, (question, answer) in enumerate(turns):
        content = [{"type": "text", "text": question}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"messages": messages, "images": [str(image)], "task": task, "id": record_id}


def _prompt(source: Source, instruction: str, **fields) -> str:
    return task_prompt(instruction, source.options.get("prompt_template"), **fields)


def _field(row: dict, key: str, where: str):
    if not isinstance(row, dict) or row.get(key) in (None, ""):
        raise DataError(f"{where}: the record has no {key!r}")
    return row[key]


def _image(source: Source, name: str, where: str) -> tuple[Path, tuple[int, int]]:
    return image_file(name, source.image_root if source.image_root is not None else source.path.parent, where)


def build_conversations(source: Source) -> Iterator[dict]:
    """LLaVA/SPHINX conversation records; `<image>` markers in the text are dropped (the image comes first)."""
    for index, row in enumerate(read_rows(source.path)):
        where = f"{source.path}, record {index}"
        image, _ = _image(source, _field(row, "image", where), where)
        turns = _field(row, "conversations", where)
        roles = [turn.get("from") if isinstance(turn, dict) else None for turn in turns]
        if len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
            raise DataError(
                f"{where}: the conversation must alternate 'human' and 'gpt' turns, starting with 'human'; got {roles}"
            )
        values = [str(turn.get("value", "")).replace("<image>", "").strip() for turn in turns]
        pairs = list(zip(values[::2], values[1::2], strict=True))
        yield sample(image, pairs, "conversations", f"{source.label()}#{row.get('id', index)}")


def build_vqa(source: Source) -> Iterator[dict]:
    """Short-answer VQA rows (`answer`, or VQAv2's `answers`: the most given), with the original's "single word or
    phrase" instruction."""
    for index, row in enumerate(read_rows(source.path)):
        where = f"{source.path}, record {index}"
        image, _ = _image(source, _field(row, "image", where), where)
        instruction = row.get("instruction") or source.options.get("instruction", "vqa_short")
        if instruction not in ("vqa_short", "vqa_vizwiz"):
            raise DataError(f"{where}: instruction must be vqa_short or vqa_vizwiz, got {instruction!r}")
        question = _prompt(source, instruction, question=_field(row, "question", where))
        answer = Counter(vqa_answers(row, where)).most_common(1)[0][0]  # VQAv2's annotators: the most given
        yield sample(image, [(question, answer)], "vqa", f"{source.label()}#{row.get('id', index)}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _coco_sections(source: Source) -> dict[str, list[dict]]:
    if not source.path.is_file():
        raise DataError(f"{source.path}: the data file does not exist")
    try:
        data = json.loads(source.path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{source.path}: not a COCO annotation file (not JSON: {error})") from None
    sections = {}
    for key in ("images", "annotations", "categories"):
        section = data.get(key) if isinstance(data, dict) else None
        if not isinstance(section, list) or not all(isinstance(item, dict) for item in section):
            raise DataError(f"{source.path}: not a COCO annotation file ('{key}' must be a list of records)")
        sections[key] = section
    return sections


def _coco(source: Source, keypoints: bool = False):
    """COCO annotations grouped by image: `(image record, [annotations], {category id: name})`."""
    sections = _coco_sections(source)
    categories, images = {}, {}
    for category in sections["categories"]:
        if not _is_id(category.get("id")) or not isinstance(category.get("name"), str):
            raise DataError(f"{source.path}: category {category!r} needs an id and a name")
        categories[category["id"]] = category["name"]
    for image in sections["images"]:
        if not _is_id(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise DataError(f"{source.path}: image {image!r} needs an id and a file_name")
        images[image["id"]] = image
    per_image = {image_id: [] for image_id in images}
    for annotation in sections["annotations"]:
        if annotation.get("iscrowd"):
            continue
        if keypoints and not annotation.get("num_keypoints", 0):
            continue
        if not _is_id(annotation.get("image_id")) or annotation["image_id"] not in per_image:
            raise DataError(f"{source.path}: annotation {annotation.get('id')} names an unknown image_id")
        per_image[annotation["image_id"]].append(annotation)
    for image_id, image in images.items():
        yield image, per_image[image_id], categories


def _boxes_by_category(annotations, categories, where, size) -> dict[str, list[list[float]]]:
    grouped = {}
    for annotation in annotations:
        at = f"{where}, annotation {annotation.get('id')}"
        category = annotation.get("category_id")
        name = categories.get(category) if _is_id(category) else None
        if name is None:
            raise DataError(f"{at}: unknown category_id {category!r}")
        grouped.setdefault(name, []).append(record_box({"bbox": annotation.get("bbox")}, size, at))
    return grouped


def build_detection(source: Source) -> Iterator[dict]:
    """One sample per image and category present: "Detect all {category} shown in the image." → its boxes."""
    for image, annotations, categories in _coco(source):
        where = f"{source.path}, image {image['id']}"
        path, size = _image(source, image["file_name"], where)
        for name, boxes in _boxes_by_category(annotations, categories, where, size).items():
            question = _prompt(source, "detection", category=name)
            record = f"{source.label()}#{image['id']}/{name}"
            yield sample(path, [(question, format_boxes(boxes, size))], "detection", record)


def build_grounded_caption(source: Source) -> Iterator[dict]:
    """Every category of the image as a grounded phrase with its boxes: `<p>dog</p>[...], <p>cat</p>[...]`."""
    for image, annotations, categories in _coco(source):
        if not annotations:
            continue
        where = f"{source.path}, image {image['id']}"
        path, size = _image(source, image["file_name"], where)
        grouped = _boxes_by_category(annotations, categories, where, size)
        answer = format_grounded(list(grouped.items()), size)
        question = _prompt(source, "grounded_caption")
        yield sample(path, [(question, answer)], "grounded_caption", f"{source.label()}#{image['id']}")


def build_keypoints(source: Source) -> Iterator[dict]:
    """COCO person keypoints: the person's box in the prompt, its labelled joints in the answer."""
    for image, annotations, _ in _coco(source, keypoints=True):
        where = f"{source.path}, image {image['id']}"
        if not annotations:
            continue
        path, size = _image(source, image["file_name"], where)
        for annotation in annotations:
            at = f"{where}, annotation {annotation.get('id')}"
            box = record_box({"bbox": annotation.get("bbox")}, size, at)
            points = annotation.get("keypoints")
            if not isinstance(points, list) or len(points) % 3 or not all(_is_number(v) for v in points):
                raise DataError(f"{at}: keypoints are [x, y, visibility] numbers per joint, got {points!r}")
            for joint in range(len(points) // 3):
                if points[3 * joint + 2] > 0:
                    x, y = points[3 * joint : 3 * joint + 2]
                    if not (0 <= x <= size[1] and 0 <= y <= size[0]):
                        raise DataError(f"{at}: keypoint {joint} ({x:g}, {y:g}) is outside the image")
            question = _prompt(source, "keypoints", box=format_box(box, size))
            try:
                answer = format_keypoints(points, size)
            except ValueError as error:
                raise DataError(f"{at}: {error}") from None
            yield sample(path, [(question, answer)], "keypoints", f"{source.label()}#{annotation.get('id')}")


def _referring_records(source: Source) -> Iterator[tuple[Path, tuple[int, int], list[float], list[str], str]]:
    for index, row in enumerate(read_rows(source.path)):
        where = f"{source.path}, record {index}"
        path, size = _image(source, _field(row, "image", where), where)
        box = record_box(row, size, where)
        expressions = row.get("sentences") or [_field(row, "expression", where)]
        yield path, size, box, [str(e) for e in expressions], f"{source.label()}#{row.get('id', index)}"


def build_referring_expression(source: Source) -> Iterator[dict]:
    """Referring-expression grounding: the expression in the prompt, its box as the answer."""
    for path, size, box, expressions, record in _referring_records(source):
        for number, expression in enumerate(expressions):
            question = _prompt(source, "referring_expression", expression=expression.rstrip("."))
            yield sample(path, [(question, format_box(box, size))], "referring_expression", f"{record}/{number}")


def build_region_caption(source: Source) -> Iterator[dict]:
    """Region captioning: the box in the prompt, the expression as the answer."""
    for path, size, box, expressions, record in _referring_records(source):
        for number, expression in enumerate(expressions):
            question = _prompt(source, "region_caption", box=format_box(box, size))
            yield sample(path, [(question, expression)], "region_caption", f"{record}/{number}")


def build_text_detection(source: Source) -> Iterator[dict]:
    """OCR with boxes: every text of the image as a grounded phrase, `<p>text</p>[box]`."""
    for index, row in enumerate(read_rows(source.path)):
        where = f"{source.path}, record {index}"
        path, size = _image(source, _field(row, "image", where), where)
        texts = _field(row, "texts", where)
        phrases = [(str(_field(t, "text", where)), [pixel_box(_field(t, "box", where), size, where)]) for t in texts]
        question = _prompt(source, "text_detection")
        answer = format_grounded(phrases, size)
        yield sample(path, [(question, answer)], "text_detection", f"{source.label()}#{row.get('id', index)}")


def build_chart_to_table(source: Source) -> Iterator[dict]:
    """Chart parsing: the chart's data table as the answer."""
    for index, row in enumerate(read_rows(source.path)):
        where = f"{source.path}, record {index}"
        path, _ = _image(source, _field(row, "image", where), where)
        question = _prompt(source, "chart_to_table")
        answer = str(_field(row, "table", where))
        yield sample(path, [(question, answer)], "chart_to_table", f"{source.label()}#{row.get('id', index)}")


TASK_BUILDERS: dict[str, Callable[[Source], Iterator[dict]]] = {
    "conversations": build_conversations,
    "vqa": build_vqa,
    "detection": build_detection,
    "grounded_caption": build_grounded_caption,
    "keypoints": build_keypoints,
    "referring_expression": build_referring_expression,
    "region_caption": build_region_caption,
    "text_detection": build_text_detection,
    "chart_to_table": build_chart_to_table,
}


def build_samples(source: Source) -> Iterator[dict]:
    if source.task not in TASK_BUILDERS:
        raise DataError(f"{source.path}: unknown task {source.task!r}; known: {', '.join(TASK_BUILDERS)}")
    return TASK_BUILDERS[source.task](source)


def _non_empty_string(value) -> bool:
    return isinstance(value, str) and bool(value)


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and 0 < value < math.inf


@strict
@dataclass
class SourceEntry:
    """One entry of a mixture YAML's `sources`, as written (paths relative to the YAML)."""

    task: str = ruled(
        lambda value: f"unknown task {value!r}; known: {', '.join(TASK_BUILDERS)}", TASK_BUILDERS.__contains__
    )
    path: str = ruled("path must be a non-empty string, got {value!r}", _non_empty_string)
    image_root: str | None = ruled(
        "image_root must be a non-empty string, got {value!r}", lambda v: v is None or bool(v), default=None
    )
    weight: int | float = ruled("weight must be a positive number, got {value!r}", _positive_number, default=1.0)
    name: str | None = ruled(
        "name must be a non-empty string, got {value!r}", lambda v: v is None or bool(v), default=None
    )
    options: dict | None = ruled("options must be a mapping, got {value!r}", default=None)


@strict
@dataclass
class MixtureFile:
    """A task-mixture YAML: its `sources` and the `seed` of their interleaving."""

    sources: list = ruled(
        "the mixture has no sources (a 'sources:' list of {{task, path, image_root, weight}}), got {value!r}", bool
    )
    seed: int = ruled("the mixture's seed is an integer, got {value!r}", lambda v: not isinstance(v, bool), default=0)


def read_mixture(mixture: str | Path | dict) -> tuple[list[Source], int]:
    """The sources of a mixture YAML (paths relative to it) and its `seed` (`MixtureFile`, `SourceEntry`).

    ```yaml
    seed: 0
    sources:
      - {task: vqa, path: vqa.jsonl, image_root: images, weight: 2}
      - {task: referring_expression, path: refcoco.jsonl, image_root: images}
    ```

    A source's `options` may hold `prompt_template`: one instruction with a `{content}` field that replaces the
    task's own (`{content}` gets the question, expression, box or category), e.g. to measure what the
    task-specific instructions buy; evaluate such a model with the same `prompt_template`.
    """
    base = Path.cwd()
    if isinstance(mixture, (str, Path)):
        base = Path(mixture).parent
        mixture = read_yaml_file(mixture, "mixture file", DataError, MIXTURE_SHAPE)
    if not isinstance(mixture, dict):
        raise DataError(f"{MIXTURE_SHAPE}, got {mixture!r}")
    read_file = read(MixtureFile, {"sources": None, **mixture}, DataError, unknown="unknown mixture key {value!r}")
    return [_source(entry, base) for entry in read_file.sources], read_file.seed


def _source(entry, base: Path) -> Source:
    """One checked mixture entry, its paths relative to `base`."""
    if not isinstance(entry, dict):
        raise DataError(f"mixture source {entry!r}: a source is a mapping of task, path, image_root, weight")
    read_entry = read(SourceEntry, entry, DataError, where=f"mixture source {entry}: ", unknown=_unknown_keys(entry))
    options = read_entry.options or {}
    if "prompt_template" in options:
        try:
            check_prompt_template(options["prompt_template"])
        except ValueError as error:
            raise DataError(f"mixture source {entry}: {error}") from None
    return Source(
        path=base / read_entry.path,
        task=read_entry.task,
        image_root=base / read_entry.image_root if read_entry.image_root is not None else None,
        weight=float(read_entry.weight),
        name=read_entry.name,
        options=options,
    )


def _unknown_keys(entry: dict):
    """The error of a source with keys `SourceEntry` does not know: all of them, sorted."""
    known = {f.name for f in fields(SourceEntry)}
    return lambda _: f"unknown keys {sorted(map(str, set(entry) - known))}"


def _generate(sources: list[dict]):
    for entry in sources:
        yield from build_samples(Source(**entry))


def load_mixture(mixture: str | Path | dict, streaming: bool = False):
    """One training dataset from a task mixture: each source sampled in proportion to its weight.

    Non-streaming sources are written once to memory-mapped Arrow files (`datasets`' cache, refreshed when a
    data file changes); `streaming=True` reads records lazily. Every record is checked as it is built.
    """
    import datasets

    sources, seed = read_mixture(mixture)
    parts = []
    for source in sources:
        entry = dict(source.__dict__)
        if streaming:
            parts.append(datasets.IterableDataset.from_generator(_generate, gen_kwargs={"sources": [entry]}))
            continue
        stat = source.path.stat() if source.path.exists() else None
        stamp = (str(source.path), stat.st_mtime_ns, stat.st_size) if stat else None
        try:
            parts.append(
                datasets.Dataset.from_generator(_generate_stamped, gen_kwargs={"sources": [entry], "stamp": stamp})
            )
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, DataError):  # the record's own message, not datasets' wrapper
                raise error.__cause__ from None
            raise
    if len(parts) == 1:
        return parts[0]
    total = sum(source.weight for source in sources)
    return datasets.interleave_datasets(
        parts,
        probabilities=[source.weight / total for source in sources],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


def _generate_stamped(sources: list[dict], stamp):
    # `stamp` (path, mtime, size) only enters `datasets`' cache fingerprint, so an edited file is read again
    yield from _generate(sources)
