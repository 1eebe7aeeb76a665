"""The fields of a transformers decoder config that fix its tensor shapes.

Mixing requires them to agree between checkpoints; a model card compares them with a release's to tell a
release from a reduced-size model. Kept free of imports so that `sphinx-mllm mix` starts fast.
"""

DECODER_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_local_experts",
)
