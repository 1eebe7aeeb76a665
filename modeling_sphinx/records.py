"""Readers of the records that training data and evaluation share: rows, boxes and images.

One reader per thing, so a box or an image that one tool accepts, every tool accepts, with the same message
when it does not: a `DataError` (a `ValueError`) that starts with where the record is. Images are read two ways
only: their size from the header (`image_size`), and decoded in full by the processor's own `load_image_file`
(`open_image`).
"""

import csv
import io
import json
from pathlib import Path

import PIL.Image

from .processing.image_processing_sphinx import load_image_file, to_rgb

# Annotation tools round box corners to the pixel grid, so a corner may sit up to half a pixel outside the image.
BOX_TOLERANCE = 0.5


class DataError(ValueError):
    """A record that cannot be used, with the file and record it came from."""


def read_rows(path: str | Path) -> list[dict]:
    """The records of a JSON (a list), JSONL, CSV or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the data file does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            rows = json.loads(path.read_text())
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".csv":
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        elif suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet

            try:
                rows = pyarrow.parquet.read_table(path).to_pylist()
            except pyarrow.ArrowException as error:
                raise DataError(f"{path}: not a readable Parquet file: {error}") from None
        else:
            raise DataError(f"{path}: unknown data format {suffix!r} (use .json, .jsonl, .csv or .parquet)")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, csv.Error) as error:
        raise DataError(f"{path}: cannot read the data: {error}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of records, got {type(rows).__name__}")
    return rows


def vqa_answers(row: dict, where: str) -> list[str]:
    """The answers of a VQA record: `answer` (one) or `answers` (VQAv2's annotators: strings or `{"answer": ...}`)."""
    answers = row.get("answers")
    if answers is None:
        if row.get("answer") is None:
            raise DataError(f"{where}: the record has no 'answer' (a string) or 'answers' (a list)")
        return [str(row["answer"])]
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{where}: 'answers' is a non-empty list of answers, got {answers!r}")
    return [str(a["answer"]) if isinstance(a, dict) and "answer" in a else str(a) for a in answers]


def xywh_to_xyxy(bbox) -> list[float]:
    """A COCO `[x, y, width, height]` box as `[x1, y1, x2, y2]`."""
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def pixel_box(box, image_size: tuple[int, int], where: str) -> list[float]:
    """A pixel box `[x1, y1, x2, y2]` inside the `(height, width)` image, clamped to it (`BOX_TOLERANCE` allowed)."""
    height, width = image_size
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"{where}: a box is 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    low, high_x, high_y = -BOX_TOLERANCE, width + BOX_TOLERANCE, height + BOX_TOLERANCE
    if not (low <= x1 < x2 <= high_x and low <= y1 < y2 <= high_y):
        raise DataError(
            f"{where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is not inside the {width}x{height} image "
            "(boxes are [x1, y1, x2, y2] in pixels, x1 < x2, y1 < y2)"
        )
    return [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]


def record_box(row: dict, image_size: tuple[int, int], where: str) -> list[float]:
    """The checked pixel box of a record: `box` as `[x1, y1, x2, y2]` or COCO's `bbox` as `[x, y, w, h]`."""
    if row.get("box") is not None:
        return pixel_box(row["box"], image_size, where)
    if row.get("bbox") is not None:
        try:
            return pixel_box(xywh_to_xyxy(row["bbox"]), image_size, where)
        except (TypeError, ValueError):
            raise DataError(f"{where}: a COCO bbox is 4 numbers [x, y, w, h], got {row['bbox']!r}") from None
    raise DataError(f"{where}: the record has no 'box' ([x1, y1, x2, y2]) or 'bbox' ([x, y, w, h])")


def _resolve(name, root: Path | None) -> Path:
    path = Path(name)
    return path if path.is_absolute() or root is None else Path(root) / path


def image_file(name: str, root: Path | None, where: str) -> tuple[Path, tuple[int, int]]:
    """The image file a record names (relative to `root`) and its `(height, width)`, read from the file header
    alone: training hands the path on and decodes the image only when a batch needs it."""
    if not isinstance(name, (str, Path)) or not str(name):
        raise DataError(f"{where}: 'image' is the path of an image file, got {name!r}")
    path = _resolve(name, root)
    if not path.is_file():
        raise DataError(f"{where}: image file {str(path)!r} does not exist")
    return path, image_size(path, where)


def image_size(path: str | Path, where: str | None = None) -> tuple[int, int]:
    """`(height, width)` of an image file from its header alone (nothing is decoded), or a `DataError` naming it."""
    prefix = f"{where}: " if where else ""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise DataError(f"{prefix}cannot read image {str(path)!r}: {error}") from None
    return height, width


def open_image(value, root: Path | None = None, where: str | None = None) -> PIL.Image.Image:
    """An 8-bit RGB image, decoded in full with its EXIF orientation applied, from a path (relative to `root`), a
    PIL image, or what `datasets` stores (`{"bytes": ...}` or `{"path": ...}`)."""
    prefix = f"{where}: " if where else ""
    try:
        if isinstance(value, PIL.Image.Image):
            return to_rgb(value)
        if isinstance(value, dict) and value.get("bytes"):
            return to_rgb(PIL.Image.open(io.BytesIO(value["bytes"])))
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, (str, Path)) or not str(path):
            raise DataError("the image is neither a path, a PIL image nor embedded bytes")
        return to_rgb(load_image_file(str(_resolve(path, root))))
    except (ValueError, OSError) as error:  # decoding errors, already naming the file
        raise DataError(f"{prefix}{error}") from None
