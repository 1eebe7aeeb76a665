"""Multi-task SFT of SPHINX with TRL's SFTTrainer: the script behind `sphinx-mllm train`, for `accelerate launch`.

Tested (tiny model, CPU; the test suite runs both):

    sphinx-mllm train recipes/sft/smoke.yaml --model-name-or-path runs/tiny --mixture MIXTURE.yaml
    accelerate launch --num_processes 2 --cpu recipes/sft/sft_sphinx.py --config recipes/sft/smoke.yaml \
        --model-name-or-path runs/tiny --mixture MIXTURE.yaml

The presets, the many-GPU commands and the measured times are in recipes/README.md.
"""

import sys

import modeling_sphinx  # noqa: F401  (registers the SPHINX classes)
from modeling_sphinx.training import main

if __name__ == "__main__":
    main(sys.argv[1:])
