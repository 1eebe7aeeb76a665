"""Multi-task visual instruction tuning with TRL's `SFTTrainer`: `sphinx-mllm train` and `recipes/sft/`.

- `sft`: the tuning arguments, the collator, the trainer and `train` / `main`;
- `mixtures`: task mixtures (YAML) read into TRL's vision format, one builder per task.

May import the model files, `processing`, `inference`, `records` and `folder`; never evaluation, serving or the
miniature. The public names are re-exported here (`from modeling_sphinx.training import train`).
"""

from .sft import (
    IMAGE_BOUNDARIES,
    LLM_LINEAR_LAYERS,
    PROJECTOR_LAYERS,
    ImageBoundaryCheckpoints,
    SphinxDataCollator,
    SphinxSFTTrainer,
    SphinxTuningArguments,
    StageProgress,
    check_max_length,
    load_model_to_tune,
    lora_config,
    main,
    make_parser,
    train,
)

__all__ = [
    "IMAGE_BOUNDARIES",
    "LLM_LINEAR_LAYERS",
    "PROJECTOR_LAYERS",
    "ImageBoundaryCheckpoints",
    "SphinxDataCollator",
    "SphinxSFTTrainer",
    "SphinxTuningArguments",
    "StageProgress",
    "check_max_length",
    "load_model_to_tune",
    "lora_config",
    "main",
    "make_parser",
    "train",
]
