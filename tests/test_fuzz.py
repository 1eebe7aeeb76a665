"""Malformed input at volume: any input to the parsers and loaders either parses or raises the
documented `ValueError` (`DataError`, `RecipeError`) naming the problem; never another exception, never a hang.
Examples are bounded (`EXAMPLES` each) and seeded by hypothesis' database-free derandomised mode."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modeling_sphinx.mixing import METHODS, Recipe
from modeling_sphinx.processing.image_processing_sphinx import SphinxImageProcessor, SphinxImageProcessorPil
from modeling_sphinx.processing.tasks_sphinx import parse_grounding
from modeling_sphinx.records import DataError, read_rows
from modeling_sphinx.training.mixtures import TASK_BUILDERS, Source, build_samples, read_mixture

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

# JSON-like values: what a hand-edited file can hold
scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)  # fmt: skip
# answer-like text: brackets, digits, separators and tags more often than chance would give them
answer_text = st.text(alphabet=st.sampled_from(list("[]0123456789.,; <p>/ab\n#-e")), max_size=80) | st.text(
    max_size=40
)


@FUZZ
@given(answer_text, st.tuples(st.integers(1, 4000), st.integers(1, 4000)))
def test_any_answer_parses_into_boxes_inside_the_image(text, size):
    grounded = parse_grounding(text, size)
    height, width = size
    for box in grounded.boxes:
        assert len(box) == 4 and all(np.isfinite(box))
    for point in grounded.points:
        assert len(point) == 2
    assert isinstance(grounded.text, str) and height > 0 and width > 0


recipe_entries = st.dictionaries(st.sampled_from(["model", "parameters", "x"]), values | st.just("a"), max_size=3)
recipes = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(sorted(METHODS)) | values},
    optional={"models": st.lists(recipe_entries | values, max_size=3) | values, "base_model": values,
              "parameters": st.dictionaries(st.sampled_from(["weight", "density", "epsilon", "x"]), values) | values,
              "dtype": values | st.sampled_from(["float32", "bfloat16"]), "out_dtype": values,
              "random_seed": values, "mixed_tensors": values},
)  # fmt: skip


@FUZZ
@given(recipes | values)
@example({"merge_method": []})  # the defects these tests found, pinned
@example({"merge_method": "linear", "models": 5})
@example({"merge_method": "linear", "models": [{"model": "a"}], "random_seed": "x"})
@example({"merge_method": "linear", "models": [{"model": "a"}], "mixed_tensors": [5]})
def test_any_mixing_recipe_loads_or_names_its_problem(recipe):
    try:
        Recipe.load(recipe)
    except ValueError as error:
        assert str(error)


@FUZZ
@given(st.dictionaries(st.sampled_from(["seed", "sources"]), values, max_size=2)
       | st.fixed_dictionaries({"sources": st.lists(st.dictionaries(
           st.sampled_from(["task", "path", "image_root", "weight", "name", "options", "extra"]),
           values | st.sampled_from(sorted(TASK_BUILDERS)), max_size=6), max_size=3)}))  # fmt: skip
@example({"seed": None, "sources": [""]})
@example({"sources": True})
@example({"sources": [{"task": "vqa", "path": "x.jsonl", "weight": "heavy"}]})
@example({"sources": [{"task": ["vqa"], "path": "x.jsonl"}]})
def test_any_task_mixture_reads_or_names_its_problem(mixture):
    try:
        read_mixture(mixture)
    except ValueError as error:
        assert str(error)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz-images")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "a.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return root


# records with the fields the builders read, each filled with anything
record_fields = ["image", "question", "answer", "instruction", "expression", "sentences", "box", "bbox", "texts",
                 "table", "conversations", "id"]  # fmt: skip
records = st.lists(st.dictionaries(st.sampled_from(record_fields), values | st.sampled_from(["a.png", "broken.png"]),
                                   max_size=6) | values, max_size=3)  # fmt: skip
coco = st.fixed_dictionaries({"images": values, "annotations": values, "categories": values}) | values


@FUZZ
@given(st.sampled_from(sorted(TASK_BUILDERS)), records, coco)
@example(task="detection", rows=[], annotations={"images": [], "annotations": None, "categories": []})
@example(task="chart_to_table", rows=[{"image": []}], annotations=[])
@example(task="detection", rows=[], annotations={"images": [{"id": [1], "file_name": "a.png"}], "annotations": [],
                                                 "categories": []})  # fmt: skip
@example(task="keypoints", rows=[], annotations={
    "images": [{"id": 1, "file_name": "a.png"}], "categories": [],
    "annotations": [{"id": 1, "image_id": 1, "num_keypoints": 1, "bbox": [0, 0, 10, 10], "keypoints": "x"}]})  # fmt: skip
def test_every_dataset_builder_builds_or_names_the_bad_record(image_folder, task, rows, annotations):
    with tempfile.TemporaryDirectory() as scratch:
        is_coco = task in ("detection", "grounded_caption", "keypoints")
        path = Path(scratch) / ("data.json" if is_coco or task == "conversations" else "data.jsonl")
        if is_coco or task == "conversations":
            path.write_text(json.dumps(annotations if is_coco else rows, allow_nan=True))
        else:
            path.write_text("".join(json.dumps(row, allow_nan=True) + "\n" for row in rows))
        try:
            for sample in build_samples(Source(path=path, task=task, image_root=image_folder)):
                assert sample["messages"] and sample["images"]
        except DataError as error:
            assert str(error)


@FUZZ
@given(st.sampled_from([".json", ".jsonl", ".csv", ".parquet", ".txt"]), st.binary(max_size=200) | values.map(lambda v: json.dumps(v, allow_nan=True).encode()))  # fmt: skip
@example(".parquet", b"")
@example(".csv", b"a\x00b\n")
def test_the_eval_readers_read_any_file_or_name_it(suffix, content):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"rows{suffix}"
        path.write_bytes(content)
        try:
            rows = read_rows(path)
        except DataError as error:
            assert str(path) in str(error)
        else:
            assert isinstance(rows, list)


dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_])
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple) | st.sampled_from([(5, 7, 3), (3, 5, 7), (6, 6, 4), (4, 6, 6), (6, 5, 1)])  # fmt: skip
norms = st.none() | st.floats(-2, 2) | st.lists(st.floats(-2, 2) | st.just(float("nan")), max_size=5)


@FUZZ
@given(st.sampled_from([SphinxImageProcessor, SphinxImageProcessorPil]), shapes.flatmap(lambda shape: dtypes.flatmap(
    lambda dtype: arrays(dtype, shape))), norms, norms)  # fmt: skip
@example(SphinxImageProcessor, np.zeros((1, 2, 3), np.uint8), 2.0, None)  # the padding colour overflowed
@example(SphinxImageProcessorPil, np.full((2, 2, 3), np.nan, np.float32), None, None)
@example(SphinxImageProcessor, np.zeros((2, 3, 4), np.uint8), [0.5] * 4, [0.5] * 4)
def test_the_image_processors_take_any_array_or_name_the_problem(backend, image, mean, std):
    processor = backend(size={"height": 28, "width": 28})
    kwargs = {k: v for k, v in (("image_mean", mean), ("image_std", std)) if v is not None}
    try:
        pixels = processor(image, return_tensors="pt", **kwargs)["pixel_values"]
    except ValueError as error:
        assert str(error)
    else:
        batch = image.shape[0] if image.ndim == 4 else 1  # a 4-D array is a batch of images
        assert tuple(pixels.shape) == (batch, 3, 28, 28)


def test_four_channel_arrays_with_four_normalisation_values_are_named():
    """Regression: a 4-value mean/std used to end in a torch RuntimeError inside `pad_to_square`."""
    image = np.zeros((20, 30, 4), np.uint8)
    for backend in (SphinxImageProcessor, SphinxImageProcessorPil):
        processor = backend(size={"height": 28, "width": 28})
        with pytest.raises(ValueError, match=r"image_mean must be 3 finite numbers \(one per RGB channel\) or 1"):
            processor(image, image_mean=[0.5] * 4, image_std=[0.5] * 4, return_tensors="pt")
        with pytest.raises(ValueError, match="image_std must not hold a zero"):
            processor(image, image_std=[0.5, 0.0, 0.5], return_tensors="pt")
        with pytest.raises(ValueError, match="an image array holds NaN or infinite values"):
            processor(np.full((4, 4, 3), np.nan, np.float32), return_tensors="pt")
        one = processor(image, image_mean=0.5, image_std=0.25, return_tensors="pt")["pixel_values"]  # one for all
        three = processor(image, image_mean=[0.5] * 3, image_std=[0.25] * 3, return_tensors="pt")["pixel_values"]
        assert one.equal(three)
