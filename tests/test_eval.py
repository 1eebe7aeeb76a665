"""Evaluation: metrics on worked examples, `sphinx-mllm eval`, and the lmms-eval plugin."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from modeling_sphinx.cli import main
from modeling_sphinx.evaluation import metrics
from modeling_sphinx.evaluation.runner import evaluate
from modeling_sphinx.processing.tasks_sphinx import format_box

WIDE = (100, 200)  # (height, width): padded to a 200-px square, 50 rows above


def test_vqa_normalisation_and_soft_accuracy():
    cases = {
        "Two": "2",
        "the dog.": "dog",
        "isnt": "isn't",
        "Yes,": "yes",
        "a red-and-white  bus!": "red and white bus",
        "none": "0",
        "3.5": "3.5",
        "1,000": "1000",
        "It's (maybe) blue?": "it's maybe blue",
    }
    for raw, normalised in cases.items():
        assert metrics.normalize_answer(raw) == normalised, raw
    answers = ["2"] * 2 + ["3"] * 8
    # leaving out one of the two "2"s leaves 1 match (1/3), leaving out a "3" leaves 2 (2/3): (2/3 + 16/3) / 10
    assert metrics.vqa_accuracy("two", answers) == pytest.approx(0.6)
    assert metrics.vqa_accuracy("3", answers) == 1.0  # 7 or 8 matching annotators, capped at 3
    assert metrics.vqa_accuracy("four", answers) == 0.0
    assert metrics.vqa_accuracy("Unanswerable.", ["unanswerable"]) == 1.0  # VizWiz, single reference
    assert metrics.vqa_accuracy("cat", ["dog"]) == 0.0


def test_multiple_choice_and_pope():
    options = ["a cat", "a dog", "a bird"]
    assert [metrics.multiple_choice_letter(a, options) for a in ("B", "(C) a bird", "A.", "a dog", "maybe")] == [
        "B",
        "C",
        "A",
        "B",
        None,
    ]
    result = metrics.pope_metrics(["Yes", "No, there is not.", "yes", "no"], ["yes", "yes", "no", "no"])
    # tp 1, fn 1, fp 1, tn 1
    assert result == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}


def test_rec_iou_on_a_padded_non_square_image():
    target = [20.0, 10.0, 120.0, 60.0]
    # the model answers in fractions of the 200-px padded square: y = (pixel + 50) / 200
    answer = "[0.20,0.30,0.70,0.55]"  # pixels [40, 10, 140, 60]
    predicted = metrics.predicted_box(answer, WIDE)
    assert predicted == pytest.approx([40.0, 10.0, 140.0, 60.0])
    # intersection 80 x 50 = 4000, union 5000 + 5000 - 4000 = 6000
    assert metrics.box_iou(predicted, target) == pytest.approx(4000 / 6000)
    result = metrics.rec_metrics([predicted, None], [target, target])
    assert result == {"acc@0.5": 0.5, "mean_iou": pytest.approx(4000 / 6000 / 2)}


def test_coco_average_precision_through_pycocotools():
    truth = {
        "images": [{"id": 1, "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "box"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 100, 50], "area": 5000, "iscrowd": 0}
        ],
    }
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [20, 10, 100, 50], "score": 1.0}]
    assert metrics.coco_average_precision(truth, perfect)["ap"] == pytest.approx(1.0)
    shifted = [{"image_id": 1, "category_id": 1, "bbox": [70, 10, 100, 50], "score": 1.0}]  # IoU 1/3
    assert metrics.coco_average_precision(truth, shifted)["ap50"] == 0.0
    assert metrics.coco_average_precision(truth, []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rows = []
    for index, (name, colour) in enumerate(
        {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}.items()
    ):
        image = Image.new("RGB", (200, 100), (235, 235, 235))
        box = [20 + 40 * index, 10, 120 + 40 * index, 60]
        ImageDraw.Draw(image).rectangle(box, fill=colour)
        image.save(root / f"{name}.png")
        rows += [
            {"id": f"{name}-colour", "image": f"{name}.png", "question": "What colour is the box?", "answer": name,
             "expression": f"the {name} box", "box": box},
            {"id": f"{name}-shape", "image": f"{name}.png", "question": "What shape is it?", "answer": "square",
             "expression": f"the {name} square", "box": box},
        ]  # fmt: skip
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root, rows


class ScriptedModel:
    """Stands in for a SPHINX model: `generate` answers each prompt with a scripted text (the oracle)."""

    def __init__(self, processor, answers: dict[str, str], fail_after: int | None = None):
        self.processor, self.answers, self.fail_after, self.calls = processor, answers, fail_after, 0
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def generate(self, input_ids, **kwargs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("the machine went away")
        tokenizer = self.processor.tokenizer
        texts = [
            tokenizer.decode(row[row != self.processor.image_token_id], skip_special_tokens=True) for row in input_ids
        ]
        replies = [next((a for key, a in self.answers.items() if key in text), "") for text in texts]
        encoded = [tokenizer(r + "\n###", add_special_tokens=False)["input_ids"] if r else [] for r in replies]
        width = max(len(e) for e in encoded) or 1
        padded = [e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded]
        return torch.cat([input_ids, torch.tensor(padded, dtype=input_ids.dtype)], dim=1)


def test_oracle_scores_one_and_silence_scores_zero(eval_world, tiny_model_dir, tmp_path):
    root, rows = eval_world
    processor = AutoProcessor.from_pretrained(tiny_model_dir("sphinx"))
    rec_answers = {r["expression"] + ".": format_box(r["box"], WIDE) for r in rows}
    result = evaluate(
        ScriptedModel(processor, rec_answers), processor, "rec", root / "rows.jsonl", tmp_path / "rec", progress=False
    )
    assert result == {"acc@0.5": 1.0, "mean_iou": pytest.approx(1.0, abs=1e-6), "samples": 6}
    silent = evaluate(
        ScriptedModel(processor, {}), processor, "rec", root / "rows.jsonl", tmp_path / "silent", progress=False
    )
    assert silent["acc@0.5"] == 0.0 and silent["mean_iou"] == 0.0
    vqa = evaluate(
        ScriptedModel(processor, {"shape": "square"}),
        processor,
        "vqa",
        root / "rows.jsonl",
        tmp_path / "vqa",
        progress=False,
    )
    assert vqa["accuracy"] == pytest.approx(0.5)  # right on the shape questions only
    lines = [json.loads(line) for line in (tmp_path / "rec" / "predictions.jsonl").read_text().splitlines()]
    assert [set(line) for line in lines] == [{"id", "prompt", "answer", "parsed", "target", "score"}] * 6
    assert (
        lines[0]["prompt"]
        == "Please provide the bounding box coordinate of the region this sentence describes: the red box."
    )
    assert json.loads((tmp_path / "rec" / "metrics.json").read_text())["metrics"]["acc@0.5"] == 1.0


def test_detection_counts_exact_box_sets_and_greedy_matches():
    truth = [[0, 0, 10, 10], [20, 0, 30, 10]]
    assert metrics.matched_boxes([[0, 0, 10, 10], [0, 0, 10, 10]], truth) == 1  # one prediction claims one box
    assert metrics.matched_boxes([[21, 0, 30, 10], [0, 0, 10, 9]], truth) == 2
    result = metrics.detection_metrics([[[0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]], []], [truth[:1]] * 3)
    # exact on the first sample only; 2 of 3 predicted boxes are right; 2 of 3 true boxes found
    assert result == {"exact": pytest.approx(1 / 3), "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}


def test_region_caption_and_detection_tasks_score_an_oracle(eval_world, tiny_model_dir, tmp_path):
    root, rows = eval_world
    processor = AutoProcessor.from_pretrained(tiny_model_dir("sphinx"))
    region = {format_box(r["box"], WIDE): r["expression"] for r in rows if r["id"].endswith("colour")}
    result = evaluate(
        ScriptedModel(processor, region), processor, "region_caption", root / "rows.jsonl", tmp_path / "rc",
        progress=False,
    )  # fmt: skip
    assert result == {"exact_match": 0.5, "samples": 6}  # "the red box" is not "the red square"
    detections = [{"id": r["id"], "image": r["image"], "category": r["id"].split("-")[0], "boxes": [r["box"]]}
                  for r in rows[::2]]  # fmt: skip
    (root / "detections.jsonl").write_text("".join(json.dumps(d) + "\n" for d in detections))
    answers = {"Detect all red": format_box(rows[0]["box"], WIDE), "Detect all blue": "[0.00,0.00,0.10,0.10]"}
    result = evaluate(
        ScriptedModel(processor, answers), processor, "detection", root / "detections.jsonl", tmp_path / "det",
        progress=False,
    )  # fmt: skip
    assert result == {"exact": pytest.approx(1 / 3), "precision": 0.5, "recall": pytest.approx(1 / 3), "samples": 3}


def test_a_prompt_template_replaces_every_tasks_instruction(eval_world, tiny_model_dir, tmp_path, capsys):
    root, rows = eval_world
    processor = AutoProcessor.from_pretrained(tiny_model_dir("sphinx"))
    template = "About the image: {content}"
    answers = {f"About the image: {r['expression']}": format_box(r["box"], WIDE) for r in rows}
    result = evaluate(
        ScriptedModel(processor, answers), processor, "rec", root / "rows.jsonl", tmp_path / "generic",
        prompt_template=template, progress=False,
    )  # fmt: skip
    assert result["acc@0.5"] == 1.0
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "generic" / "predictions.jsonl").open()]
    assert prompts[0] == "About the image: the red box"
    folder, data = str(tiny_model_dir("sphinx")), str(root / "rows.jsonl")
    args = ["eval", folder, "--task", "vqa", "--data", data, "--out", str(tmp_path / "bad")]
    assert main(args + ["--prompt-template", "About {thing}"]) == 2
    assert "a prompt template is a string with a {content} field, got 'About {thing}'" in capsys.readouterr().err


def test_a_crash_keeps_the_predictions_and_resume_continues(eval_world, tiny_model_dir, tmp_path):
    root, rows = eval_world
    processor = AutoProcessor.from_pretrained(tiny_model_dir("sphinx"))
    answers = {r["expression"] + ".": format_box(r["box"], WIDE) for r in rows}
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="went away"):
        evaluate(
            ScriptedModel(processor, answers, fail_after=1),
            processor,
            "rec",
            root / "rows.jsonl",
            out,
            batch_size=2,
            progress=False,
        )
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2  # the first batch was flushed
    with pytest.raises(ValueError, match="exists; pass resume=True"):
        evaluate(ScriptedModel(processor, answers), processor, "rec", root / "rows.jsonl", out, progress=False)
    model = ScriptedModel(processor, answers)
    result = evaluate(model, processor, "rec", root / "rows.jsonl", out, batch_size=2, resume=True, progress=False)
    assert model.calls == 2 and result["samples"] == 6 and result["acc@0.5"] == 1.0
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == [r["id"] for r in rows]


def test_eval_command_on_a_tiny_model_batched_like_one_by_one(eval_world, tiny_model_dir, tmp_path, capsys):
    root, _ = eval_world
    folder = tiny_model_dir("sphinx")
    runs = {}
    for batch in ("1", "4"):
        out = tmp_path / f"batch{batch}"
        args = ["eval", str(folder), "--task", "vqa", "--data", str(root / "rows.jsonl"), "--out", str(out)]
        assert main(args + ["--batch-size", batch, "--max-new-tokens", "4", "--limit", "5"]) == 0
        runs[batch] = [json.loads(line)["answer"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert runs["1"] == runs["4"] and len(runs["1"]) == 5
    assert '"accuracy"' in capsys.readouterr().out


def test_results_recorded_as_model_index(eval_world, tiny_model_dir, tmp_path):
    import shutil

    root, _ = eval_world
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("sphinx"), folder)
    args = ["eval", str(folder), "--task", "pope", "--data", str(root / "rows.jsonl"), "--out", str(tmp_path / "p")]
    assert (
        main(args + ["--max-new-tokens", "2", "--limit", "2", "--record-in-card", "--dataset-name", "toy-pope"]) == 0
    )
    card = ModelCard.load(folder / "README.md")
    recorded = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert set(recorded) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert card.data.to_dict()["sphinx_mllm"]["kind"] == "initialised"  # the provenance survives
    assert {r.dataset_name for r in card.data.eval_results} == {"toy-pope"}


def test_bad_eval_input_is_named(eval_world, tiny_model_dir, tmp_path, capsys):
    root, rows = eval_world
    folder = str(tiny_model_dir("sphinx"))
    data = str(root / "rows.jsonl")
    assert main(["eval", folder, "--task", "captioning", "--data", data, "--out", str(tmp_path / "a")]) == 2
    known = "known: vqa, vizwiz, multiple_choice, pope, rec, region_caption, detection"
    assert f"unknown task 'captioning'; {known}" in capsys.readouterr().err
    assert main(["eval", folder, "--task", "multiple_choice", "--data", data, "--out", str(tmp_path / "b")]) == 2
    assert "missing columns ['options']" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({**rows[0], "id": "lost", "image": "nowhere.png"}) + "\n")
    assert main(["eval", folder, "--task", "vqa", "--data", str(broken), "--out", str(tmp_path / "c")]) == 2
    assert "row lost: image file" in capsys.readouterr().err
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({**rows[0], "image": str(root / "red.png"), "box": [150, 10, 260, 60]}) + "\n")
    assert main(["eval", folder, "--task", "rec", "--data", str(outside), "--out", str(tmp_path / "d")]) == 2
    assert "is not inside the 200x100 image" in capsys.readouterr().err


def _refcoco_parquet(root: Path, rows: list[dict]) -> Path:
    import datasets

    records = [
        {
            "image": Image.open(root / r["image"]),
            "bbox": [r["box"][0], r["box"][1], r["box"][2] - r["box"][0], r["box"][3] - r["box"][1]],
            "answer": [r["expression"]],
            "question_id": r["id"],
        }
        for r in rows
    ]
    path = root / "refcoco.parquet"
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "bbox": datasets.Sequence(datasets.Value("float64")),
            "answer": datasets.Sequence(datasets.Value("string")),
            "question_id": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))
    return path


def test_lmms_eval_plugin_runs_a_local_refcoco_task(eval_world, tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs the eval extra (pip install -e '.[eval]')")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    import modeling_sphinx.evaluation.lmms_eval_plugin as plugin

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, rows = eval_world
    parquet = _refcoco_parquet(root, rows)
    recipe = (Path(__file__).resolve().parents[1] / "recipes" / "eval" / "sphinx_refcoco_rec_local.yaml").read_text()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sphinx_refcoco_rec_local.yaml").write_text(recipe.replace("data/refcoco_val.parquet", str(parquet)))
    assert get_model("sphinx").__name__ == "SphinxLMMS"  # registered through the entry point

    folder = str(tiny_model_dir("sphinx"))
    model = plugin.SphinxLMMS(pretrained=folder, device="cpu", batch_size=2)
    answers = {r["expression"] + ".": format_box(r["box"], WIDE) for r in rows}  # padded-square fractions
    model.model = ScriptedModel(model.processor, answers)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    results = simple_evaluate(
        model=model, tasks=["sphinx_refcoco_rec_local"], task_manager=manager, batch_size=2, device="cpu"
    )
    scores = results["results"]["sphinx_refcoco_rec_local"]
    assert scores["refcoco_ACC@0.5,none"] == 1.0  # prompt -> answer -> un-padded box -> lmms-eval's metric

    real = plugin.SphinxLMMS(pretrained=folder, device="cpu", batch_size=2, max_new_tokens=4)
    results = simple_evaluate(
        model=real, tasks=["sphinx_refcoco_rec_local"], task_manager=manager, limit=2, device="cpu"
    )
    assert "refcoco_IoU,none" in results["results"]["sphinx_refcoco_rec_local"]


def test_unpad_boxes_maps_to_fractions_of_the_original_image(tiny_model_dir):
    pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs the eval extra (pip install -e '.[eval]')")
    from modeling_sphinx.evaluation.lmms_eval_plugin import unpad_boxes

    processor = AutoProcessor.from_pretrained(tiny_model_dir("sphinx"))
    text = unpad_boxes("[0.10,0.30,0.60,0.55]", WIDE, processor.post_process_generation)
    assert text == "[0.1000, 0.1000, 0.6000, 0.6000]"  # pixels [20, 10, 120, 60] over 200 x 100


def test_lmms_eval_plugin_says_it_is_a_generation_only_chat_model(tiny_model_dir):
    pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs the eval extra (pip install -e '.[eval]')")
    from modeling_sphinx.evaluation.lmms_eval_plugin import SphinxLMMS

    model = SphinxLMMS(pretrained=str(tiny_model_dir("sphinx")), device="cpu")
    assert model.is_simple is False  # lmms-eval builds only generation requests for chat models
    with pytest.raises(NotImplementedError, match="generation tasks only"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="single-round"):
        model.generate_until_multi_round([])


def test_proportion_interval_is_wilsons():
    from modeling_sphinx.evaluation.metrics import proportion_interval

    low, high = proportion_interval(81, 100)  # Wilson's interval for 81 / 100: 0.722 to 0.875
    assert abs(low - 0.7222) < 1e-3 and abs(high - 0.8749) < 1e-3
    low, high = proportion_interval(200, 200)
    assert 0.98 < low < 1 and high == 1.0  # a perfect score keeps a width
    for total in (8, 11, 300):  # no hits: the lower bound is exactly 0, below or at the score
        assert proportion_interval(0, total)[0] == 0.0 and proportion_interval(total, total)[1] == 1.0
    with pytest.raises(ValueError, match="got 3 of 2"):
        proportion_interval(3, 2)


def test_paired_difference_on_the_same_questions():
    from modeling_sphinx.evaluation.metrics import paired_difference

    mean, variance = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])  # differences 1, 0, 0, 1
    assert mean == 0.5 and abs(variance - (1 / 3) / 4) < 1e-12
    with pytest.raises(ValueError, match="got 2 and 3"):
        paired_difference([1, 0], [1, 0, 1])
