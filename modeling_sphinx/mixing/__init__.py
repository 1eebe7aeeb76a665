"""Weight mixing of SPHINX checkpoints from mergekit-style YAML recipes, streamed tensor by tensor.

SPHINX mixes an LLM tuned on real-world data with one tuned on synthetic data, θ = β·θ_real + (1−β)·θ_syn over
the LLM parameters: that is `merge_method: linear` with weights β and 1−β (see `recipes/mix/`). The recipe
format is mergekit's:

```yaml
merge_method: ties            # one of METHODS
base_model: path/to/base      # needed by the task-vector methods and slerp
models:
  - model: path/to/a
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true} # defaults for every model; per-model parameters win
dtype: float32                # computation dtype (float32 or float64)
out_dtype: bfloat16           # output dtype (default: each tensor's dtype in the base model)
random_seed: 0                # DARE's random masks
mixed_tensors: ['^model\\.language_model\\.', '^lm_head\\.']  # SPHINX: which tensors are mixed
```

A parameter value is a number, a list of numbers (a gradient over the decoder layers: anchors spread evenly
from the first layer to the last, linearly interpolated; tensors before the layers take the first anchor,
those after them the last), or a list of `{filter: substring, value: ...}` entries where the first entry whose
filter occurs in the tensor name wins and an entry without `filter` is the default.

Tensors not matched by `mixed_tensors` (by default the vision encoders, the projections and the start/end
embeddings) are copied from the base model, or the first model without one. `parts` sets SPHINX's parts apart
(`PARTS`: language_model, clip, convnext, dinov2, qformer, projectors, image_boundaries), each either mixed with
its own parameters, which win over the models' and the global ones, or taken whole from one of the recipe's models:

```yaml
parts:
  language_model: {parameters: {weight: 0.5}}
  clip: {from: path/to/a}
```

A text-only LLaMA or Mixtral folder may be one of the models (`donor`): its LLM tensors stand in for SPHINX's
language model, the base model gives the rest. A recipe of `stages` (a list of recipes, each with a `name` that
later stages may use as a model) runs them in order; the last one writes the output. Every tensor of the inputs is in
the output; this is checked before the output is published. The output's model card records the recipe with
each model named by its Hub id or its folder's name, never a local path.

The package, by role: `methods` (each method by its parts, and the mix of one tensor), `recipe` (the YAML read
and checked, SPHINX's parts), `donor` (a text-only LLM as a SPHINX checkpoint), `engine` (the checkpoints opened,
checked, mixed and written; stages run), `extract_lora` (a PEFT adapter of a fine-tune's difference).
"""

from .engine import mix
from .methods import METHODS, BaseRole, Combine, Consensus, Method, RecipeError, Sparsify, Weighting, mix_tensor
from .recipe import DEFAULT_MIXED, PARTS, Recipe, StagedRecipe, load_recipe, resolve_value

__all__ = [
    "DEFAULT_MIXED",
    "METHODS",
    "PARTS",
    "BaseRole",
    "Combine",
    "Consensus",
    "Method",
    "Recipe",
    "RecipeError",
    "Sparsify",
    "StagedRecipe",
    "Weighting",
    "load_recipe",
    "mix",
    "mix_tensor",
    "resolve_value",
]
