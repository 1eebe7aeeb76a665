"""`sphinx-mllm eval`: one benchmark task over local data, with the original instruction and metric.

`evaluate(model, processor, task, data, out_dir, ...)` reads a JSONL / JSON / Parquet file or a `datasets` folder,
asks every row's question with the task's SPHINX instruction (batched greedy generation, left padding), appends one
line per sample to `predictions.jsonl` (flushed per batch, so `resume=True` continues after a crash) and writes
`metrics.json` from every line. `EVAL_TASKS` holds each task's columns, instruction and metric; `docs/evaluation.md`
has them as a table.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..folder.atomic import write_text_atomic
from ..processing.tasks_sphinx import check_prompt_template, format_box, task_prompt
from ..records import open_image, pixel_box, read_rows, record_box, vqa_answers
from ..schema import suggest
from . import metrics

MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class EvalTask:
    """How a task asks, reads the answer, scores one sample and aggregates."""

    columns: tuple[tuple[str, ...], ...]  # each entry: one of these column names must be present
    prompt: Callable[[dict, tuple[int, int], str, str | None], str]  # (row, (height, width), where, template)
    parse: Callable[[str, dict, tuple[int, int]], object]
    target: Callable[[dict, tuple[int, int], str], object]  # (row, (height, width), where the row is)
    score: Callable[[object, object], float]
    aggregate: Callable[[list[dict]], dict[str, float]]


def _mean_score(name: str) -> Callable[[list[dict]], dict[str, float]]:
    return lambda rows: {name: sum(r["score"] for r in rows) / len(rows)}


def _vqa(instruction: str) -> EvalTask:
    return EvalTask(
        columns=(("image",), ("question",), ("answer", "answers")),
        prompt=lambda row, size, where, template: task_prompt(instruction, template, question=row["question"]),
        parse=lambda answer, row, size: answer.strip(),
        target=lambda row, size, where: vqa_answers(row, where),
        score=metrics.vqa_accuracy,
        aggregate=_mean_score("accuracy"),
    )


def _multiple_choice_prompt(row: dict, size: tuple[int, int], where: str, template: str | None) -> str:
    options = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(row["options"]))
    content = f"{row['question']}\n{options}"
    return f"{content}\n{MULTIPLE_CHOICE_SUFFIX}" if template is None else template.format(content=content)


def _rec_prompt(row: dict, size: tuple[int, int], where: str, template: str | None) -> str:
    return task_prompt("referring_expression", template, expression=str(row["expression"]).rstrip("."))


def _region_caption_prompt(row: dict, size: tuple[int, int], where: str, template: str | None) -> str:
    return task_prompt("region_caption", template, box=format_box(record_box(row, size, where), size))


def _boxes_target(row: dict, size: tuple[int, int], where: str) -> list[list[float]]:
    boxes = row["boxes"]
    if not isinstance(boxes, list) or not boxes:
        raise ValueError(f"{where}: 'boxes' is a non-empty list of [x1, y1, x2, y2] boxes, got {boxes!r}")
    return [pixel_box(box, size, where) for box in boxes]


EVAL_TASKS: dict[str, EvalTask] = {
    "vqa": _vqa("vqa_short"),
    "vizwiz": _vqa("vqa_vizwiz"),
    "multiple_choice": EvalTask(
        columns=(("image",), ("question",), ("options",), ("answer",)),
        prompt=_multiple_choice_prompt,
        parse=lambda answer, row, size: metrics.multiple_choice_letter(answer, list(row["options"])),
        target=lambda row, size, where: str(row["answer"]).strip().upper(),
        score=lambda parsed, target: float(parsed == target),
        aggregate=_mean_score("accuracy"),
    ),
    "pope": EvalTask(
        columns=(("image",), ("question",), ("answer",)),
        prompt=lambda row, size, where, template: task_prompt("vqa_short", template, question=row["question"]),
        parse=lambda answer, row, size: metrics.yes_or_no(answer),
        target=lambda row, size, where: str(row["answer"]).strip().lower(),
        score=lambda parsed, target: float(parsed == target),
        aggregate=lambda rows: metrics.pope_metrics([r["parsed"] for r in rows], [r["target"] for r in rows]),
    ),
    "rec": EvalTask(
        columns=(("image",), ("expression",), ("box", "bbox")),
        prompt=_rec_prompt,
        parse=lambda answer, row, size: metrics.predicted_box(answer, size),
        target=record_box,
        score=lambda parsed, target: metrics.box_iou(parsed, target) if parsed is not None else 0.0,
        aggregate=lambda rows: metrics.rec_metrics([r["parsed"] for r in rows], [r["target"] for r in rows]),
    ),
    "region_caption": EvalTask(
        columns=(("image",), ("box", "bbox"), ("expression",)),
        prompt=_region_caption_prompt,
        parse=lambda answer, row, size: answer.strip(),
        target=lambda row, size, where: str(row["expression"]),
        score=lambda parsed, target: metrics.vqa_accuracy(parsed, [target]),
        aggregate=_mean_score("exact_match"),
    ),
    "detection": EvalTask(
        columns=(("image",), ("category",), ("boxes",)),
        prompt=lambda row, size, where, template: task_prompt("detection", template, category=row["category"]),
        parse=lambda answer, row, size: metrics.predicted_boxes(answer, size),
        target=_boxes_target,
        score=lambda parsed, target: float(metrics.exact_boxes(parsed, target)),
        aggregate=lambda rows: metrics.detection_metrics([r["parsed"] for r in rows], [r["target"] for r in rows]),
    ),
}


def load_rows(data: str | Path) -> tuple[list[dict], Path]:
    """Rows of a JSONL / JSON / Parquet file or a `datasets` folder, and the folder image paths are relative to."""
    data = Path(data)
    if data.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(data))
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{data}: not a datasets folder written by save_to_disk: {error}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[next(iter(loaded))]
        return list(loaded), data
    return read_rows(data), data.parent


def read_task_rows(task: str, data: str | Path) -> tuple[list[dict], Path]:
    """`load_rows` for one of `EVAL_TASKS`, checked to have rows with the task's columns."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}{suggest(task, EVAL_TASKS)}; known: {', '.join(EVAL_TASKS)}")
    if not Path(data).exists():
        raise ValueError(f"{data}: the data file or folder does not exist")
    rows, root = load_rows(data)
    if not rows:
        raise ValueError(f"{data}: no rows to evaluate")
    present = set(rows[0]) if isinstance(rows[0], dict) else set()
    missing = [" or ".join(group) for group in EVAL_TASKS[task].columns if not present & set(group)]
    if missing:
        raise ValueError(f"{data}: missing columns {missing} (the rows have {sorted(present)})")
    return rows, root


def _done_ids(predictions: Path) -> list[dict]:
    if not predictions.is_file():
        return []
    kept = []
    for line in predictions.read_text().splitlines():
        try:
            kept.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash is asked again
            break
    return kept


def evaluate(
    model,
    processor,
    task: str,
    data: str | Path,
    out_dir: str | Path,
    batch_size: int = 4,
    limit: int | None = None,
    max_new_tokens: int = 64,
    resume: bool = False,
    progress: bool = True,
    prompt_template: str | None = None,
) -> dict[str, float]:
    """Evaluate `model` on one task; returns the metrics also written to `out_dir/metrics.json`."""
    from tqdm.auto import tqdm

    from ..inference import generate_answers, user_turn

    for name, count in (("batch_size", batch_size), ("limit", limit), ("max_new_tokens", max_new_tokens)):
        if count is not None and count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    if prompt_template is not None:
        check_prompt_template(prompt_template)
    rows, root = read_task_rows(task, data)
    spec = EVAL_TASKS[task]
    rows = rows[:limit] if limit is not None else rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / "predictions.jsonl"
    written = _done_ids(predictions) if resume else []
    if not resume and predictions.exists():
        raise ValueError(f"{predictions} exists; pass resume=True (--resume) to continue it or choose another folder")
    done = {record["id"] for record in written}
    with predictions.open("w") as handle:  # rewrite what survived, then append
        for record in written:
            handle.write(json.dumps(record) + "\n")
    pending = [(index, row) for index, row in enumerate(rows) if _row_id(row, index) not in done]
    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc=f"eval {task}", disable=not progress)
    with predictions.open("a") as handle:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            images, prompts, targets = [], [], []
            for index, row in batch:
                where = f"{data}, row {_row_id(row, index)}"
                image = open_image(row["image"], root, where)
                size = (image.height, image.width)
                try:
                    targets.append(spec.target(row, size, where))
                    prompts.append(spec.prompt(row, size, where, prompt_template))
                except KeyError as error:
                    raise ValueError(f"{where}: the record has no {error}") from None
                images.append(image)
            conversations = [[user_turn(prompt, image)] for image, prompt in zip(images, prompts, strict=True)]
            answers = generate_answers(model, processor, conversations, max_new_tokens=max_new_tokens, do_sample=False)
            for (index, row), image, prompt, answer, target in zip(
                batch, images, prompts, answers, targets, strict=True
            ):
                parsed = spec.parse(answer, row, (image.height, image.width))
                record = {
                    "id": _row_id(row, index),
                    "prompt": prompt,
                    "answer": answer,
                    "parsed": parsed,
                    "target": target,
                    "score": spec.score(parsed, target),
                }
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            bar.update(len(batch))
    bar.close()
    records = _done_ids(predictions)
    result = spec.aggregate(records)
    result["samples"] = len(records)
    write_text_atomic(
        out_dir / "metrics.json", json.dumps({"task": task, "data": str(data), "metrics": result}, indent=2) + "\n"
    )
    return result


def _row_id(row: dict, index: int):
    for key in ("id", "question_id"):
        if row.get(key) is not None:
            return row[key]
    return index


def record_in_card(model_dir: str | Path, task: str, dataset_name: str, results: dict[str, float]) -> Path:
    """Add the results to the folder's model card as `model-index` metadata (replacing earlier ones of the task)."""
    from ..folder.card import read_card_facts, write_model_card

    provenance, kwargs = read_card_facts(model_dir)
    kept = [
        r for r in kwargs.pop("eval_results") if not (r["dataset_name"] == dataset_name and r.get("task_name") == task)
    ]
    for name, value in results.items():
        if name != "samples":
            kept.append(
                {
                    "task_name": task,
                    "dataset_type": dataset_name,
                    "dataset_name": dataset_name,
                    "metric_type": name,
                    "metric_name": name,
                    "metric_value": float(value),
                }
            )
    return write_model_card(model_dir, provenance, eval_results=kept, **kwargs)
