"""Multi-task SFT of SPHINX with TRL's SFTTrainer: the script behind `sphinx-mllm train`.

Tested launch commands (tiny model, CPU; the test suite runs the first two):

    sphinx-mllm train recipes/sft/smoke.yaml --model_name_or_path runs/tiny --mixture MIXTURE.yaml
    accelerate launch --num_processes 2 --cpu recipes/sft/sft_sphinx.py --config recipes/sft/smoke.yaml \
        --model_name_or_path runs/tiny --mixture MIXTURE.yaml

On GPUs, with the accelerate configs that TRL ships (commands from recipes/README.md; not run here, no GPU was
lent to this task):

    TRL_CONFIGS=$(python -c "import pathlib, trl; print(pathlib.Path(trl.__file__).parent / 'accelerate_configs')")
    python recipes/sft/sft_sphinx.py --config recipes/sft/lora.yaml
    accelerate launch --config_file $TRL_CONFIGS/fsdp2.yaml recipes/sft/sft_sphinx.py --config recipes/sft/full.yaml
    accelerate launch --config_file $TRL_CONFIGS/zero3.yaml recipes/sft/sft_sphinx.py --config recipes/sft/full.yaml

Measured (whole command: start-up, data, 8 steps of batch 2, merged save; 2026-12-01):

| preset | model | hardware | time | peak RSS |
|---|---|---|---|---|
| smoke.yaml | tiny sphinx-1k (1455 visual tokens) | 2-core CPU, float32 | 8.1 s | 1.21 GiB |
| smoke.yaml --tuning lora | same | same | 8.6 s | 1.21 GiB |
| smoke.yaml --tuning qlora --dtype bfloat16 | same | bitsandbytes CPU backend | 9.3 s | 1.22 GiB |
| 2 processes (the accelerate command above), 4 steps | tiny sphinx | 2-core CPU, gloo | ~10 s | - |
"""

import sys

import modeling_sphinx  # noqa: F401  (registers the SPHINX classes)
from modeling_sphinx.training.sft import main

if __name__ == "__main__":
    main(sys.argv[1:])
