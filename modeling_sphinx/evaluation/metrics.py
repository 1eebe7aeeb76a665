"""Benchmark metrics of the SPHINX paper, each with its published definition.

- `vqa_accuracy`: VQAv2's soft accuracy, `min(#annotators who gave the answer / 3, 1)` averaged over the 10
  leave-one-out subsets of the 10 human answers, after the official answer normalisation (`normalize_answer`:
  punctuation, digits written as words, articles, contractions); with a single reference (GQA, OKVQA-style
  sets, VizWiz's "unanswerable" included) it is exact match after the same normalisation.
- `multiple_choice_letter` / multiple-choice accuracy: the option letter of the answer (ScienceQA, MMBench, SEED).
- `pope_metrics`: POPE's accuracy, precision, recall, F1 and yes-ratio, "yes" being the positive class.
- `box_iou`, `rec_metrics`: referring-expression Acc@IoU>=0.5 and mean IoU, boxes in pixels of the original
  image (SPHINX's answers are fractions of the padded square: `to_pixels` maps them back).
- `coco_average_precision`: detection and keypoint AP through `pycocotools` (the `eval` extra).
- `proportion_interval`, `paired_difference`: 95 % intervals of a score and of the difference between two
  models on the same questions.
"""

import math
import re

from ..processing.tasks_sphinx import parse_grounding

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """VQAv2's answer normalisation (the evaluation server's `processPunctuation` + `processDigitArticle`)."""
    original = answer.replace("\n", " ").replace("\t", " ").strip()
    text = original
    for mark in _PUNCTUATION:  # the server tests the original text and edits the copy
        if f"{mark} " in original or f" {mark}" in original or _DIGIT_COMMA.search(original) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 soft accuracy against the human `answers` (exact match after normalisation for one answer)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    references = [normalize_answer(a) for a in answers]
    if len(references) == 1:
        return float(predicted == references[0])
    scores = []
    for left_out in range(len(references)):
        others = references[:left_out] + references[left_out + 1 :]
        scores.append(min(1.0, sum(other == predicted for other in others) / 3))
    return sum(scores) / len(scores)


_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[).:,]|\s|$)")


def multiple_choice_letter(prediction: str, options: list[str]) -> str | None:
    """The option letter a free-form answer picks: a leading `A`, `(B)`, `C.`, or else the text of one option."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    match = _LETTER.match(prediction)
    if match and match.group(1) in letters:
        return match.group(1)
    spoken = normalize_answer(prediction)
    chosen = [letter for letter, option in zip(letters, options, strict=True) if normalize_answer(option) == spoken]
    return chosen[0] if len(chosen) == 1 else None


def yes_or_no(prediction: str) -> str:
    """POPE's reading of an answer: "no" when it says no or not, else "yes"."""
    words = set(re.findall(r"[a-z]+", prediction.lower()))
    return "no" if words & {"no", "not"} else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers ("yes" is the positive class)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"pope_metrics needs as many predictions as labels, got {len(predictions)} and {len(labels)}")
    said = [yes_or_no(p) == "yes" for p in predictions]
    truth = [label.strip().lower() == "yes" for label in labels]
    tp = sum(s and t for s, t in zip(said, truth, strict=True))
    fp = sum(s and not t for s, t in zip(said, truth, strict=True))
    fn = sum(not s and t for s, t in zip(said, truth, strict=True))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(said) / len(labels),
    }


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def predicted_box(answer: str, image_size: tuple[int, int]) -> list[float] | None:
    """The first box of a SPHINX answer, in pixels of the `(height, width)` image (un-padded)."""
    boxes = parse_grounding(answer, image_size).boxes
    return boxes[0] if boxes else None


def rec_metrics(predictions: list[list[float] | None], targets: list[list[float]]) -> dict[str, float]:
    """Referring-expression Acc@IoU>=0.5 and mean IoU; a missing prediction scores IoU 0."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(
            f"rec_metrics needs as many predictions as targets, got {len(predictions)} and {len(targets)}"
        )
    ious = [box_iou(p, t) if p is not None else 0.0 for p, t in zip(predictions, targets, strict=True)]
    return {"acc@0.5": sum(iou >= 0.5 for iou in ious) / len(ious), "mean_iou": sum(ious) / len(ious)}


def predicted_boxes(answer: str, image_size: tuple[int, int]) -> list[list[float]]:
    """Every box of a SPHINX answer, in pixels of the `(height, width)` image (un-padded)."""
    return parse_grounding(answer, image_size).boxes


def matched_boxes(predictions: list[list[float]], targets: list[list[float]], threshold: float = 0.5) -> int:
    """How many targets a prediction claims at IoU >= `threshold`, each prediction claiming at most one target
    (greedily, highest IoU first)."""
    pairs = sorted(
        ((box_iou(p, t), i, j) for i, p in enumerate(predictions) for j, t in enumerate(targets)), reverse=True
    )
    claimed, found = set(), set()
    for iou, i, j in pairs:
        if iou >= threshold and i not in claimed and j not in found:
            claimed.add(i)
            found.add(j)
    return len(found)


def exact_boxes(predictions: list[list[float]], targets: list[list[float]], threshold: float = 0.5) -> bool:
    """Whether the predicted boxes are the true ones: as many, each matching its own at IoU >= `threshold`."""
    return len(predictions) == len(targets) == matched_boxes(predictions, targets, threshold)


def detection_metrics(predictions: list[list[list[float]]], targets: list[list[list[float]]]) -> dict[str, float]:
    """Detection without confidences (SPHINX lists boxes, it does not score them), per image and category at
    IoU >= 0.5: the share of samples whose boxes are exactly the true ones, and box precision and recall."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(
            f"detection_metrics needs as many predictions as targets, got {len(predictions)} and {len(targets)}"
        )
    matched = [matched_boxes(p, t) for p, t in zip(predictions, targets, strict=True)]
    exact = [exact_boxes(p, t) for p, t in zip(predictions, targets, strict=True)]
    predicted = sum(len(p) for p in predictions)
    return {
        "exact": sum(exact) / len(exact),
        "precision": sum(matched) / predicted if predicted else 0.0,
        "recall": sum(matched) / sum(len(t) for t in targets),
    }


def coco_average_precision(ground_truth: dict, detections: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP, AP50 and AP75 of `detections` (COCO result dicts) against a COCO annotation dict, by pycocotools."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ValueError("COCO AP needs pycocotools: pip install -e '.[eval]'") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        results = truth.loadRes(detections) if detections else COCO()
        if not detections:
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        evaluation = COCOeval(truth, results, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(0.0, float(s)) for s in evaluation.stats[:3]]
    return {"ap": stats[0], "ap50": stats[1], "ap75": stats[2]}


def proportion_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % at z = 1.96); unlike the normal approximation it stays inside
    [0, 1] and keeps a width at 0 or `total` hits."""
    if total <= 0 or not 0 <= hits <= total:
        raise ValueError(f"proportion_interval needs 0 <= hits <= total and total > 0, got {hits} of {total}")
    share = hits / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # at 0 (or all) hits the bound is 0 (or 1) exactly; rounding would leave it a hair inside
    return (0.0 if hits == 0 else max(0.0, centre - half)), (1.0 if hits == total else min(1.0, centre + half))


def paired_difference(first: list[float], second: list[float]) -> tuple[float, float]:
    """Mean of `first - second` over the same questions, and the variance of that mean (sample variance / n)."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(
            f"paired_difference needs two equally long lists of 2+ scores, got {len(first)} and {len(second)}"
        )
    differences = [a - b for a, b in zip(first, second, strict=True)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, variance / len(differences)
