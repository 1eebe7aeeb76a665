"""Multi-task SFT of SPHINX with TRL's SFTTrainer: the script behind `sphinx-mllm train`.

Tested launch commands (tiny model, CPU; the test suite runs the first two):

    sphinx-mllm train recipes/sft/smoke.yaml --model_name_or_path runs/tiny --mixture MIXTURE.yaml
    accelerate launch --num_processes 2 --cpu recipes/sft/sft_sphinx.py --config recipes/sft/smoke.yaml \
        --model_name_or_path runs/tiny --mixture MIXTURE.yaml

On GPUs (commands from recipes/README.md; not run here, no GPU was lent to this task):

    python recipes/sft/sft_sphinx.py --config recipes/sft/lora.yaml
    accelerate launch --config_file recipes/sft/accelerate/fsdp2.yaml recipes/sft/sft_sphinx.py --config recipes/sft/full.yaml
    accelerate launch --config_file recipes/sft/accelerate/zero3.yaml recipes/sft/sft_sphinx.py --config recipes/sft/full.yaml

| preset | hardware | time | peak memory |
|---|---|---|---|
| smoke.yaml, tiny sphinx-1k, 8 steps | 2-core CPU | see recipes/README.md | see recipes/README.md |
"""

import sys

import modeling_sphinx  # noqa: F401  (registers the SPHINX classes)
from modeling_sphinx.training import main

if __name__ == "__main__":
    main(sys.argv[1:])
