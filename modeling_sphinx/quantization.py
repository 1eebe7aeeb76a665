"""The 4-bit configuration shared by QLoRA training and `sphinx-mllm chat --load-in-4bit`.

Only the LLM is quantized (NF4, double quantisation): the vision towers, the projectors and `lm_head` stay in
16-bit, since bitsandbytes would otherwise turn every `nn.Linear` of the towers into 4-bit too. A skip list
replaces bitsandbytes' default skips, so the output head is named as well.
"""

import torch

QUANTIZATION_SKIP = [
    "model.clip",
    "model.convnext",
    "model.dinov2",
    "model.qformer",
    "model.qformer_proj",
    "model.visual_proj",
    "lm_head",
]


def four_bit_config(compute_dtype: torch.dtype = torch.bfloat16):
    """`BitsAndBytesConfig` for the LLM alone, computing (and storing, for FSDP) in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=compute_dtype,
        llm_int8_skip_modules=QUANTIZATION_SKIP,
    )
