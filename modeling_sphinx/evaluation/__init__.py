"""Scoring a model: `sphinx-mllm eval` over local data, the metrics, and the lmms-eval plugin.

- `runner`: the eval tasks (`EVAL_TASKS`) and `evaluate`, batched and resumable, writing predictions and metrics;
- `metrics`: the published definitions (VQA accuracy, POPE, Acc@IoU, detection sets, COCO AP, intervals);
- `lmms_eval_plugin`: SPHINX as an lmms-eval model (the `lmms_eval.models` entry point).

May import the model files, `processing`, `inference`, `records` and `folder`; never training, serving or the
miniature. `evaluate` and `record_in_card` are re-exported here.
"""

from .runner import EVAL_TASKS, evaluate, read_task_rows, record_in_card

__all__ = ["EVAL_TASKS", "evaluate", "read_task_rows", "record_in_card"]
