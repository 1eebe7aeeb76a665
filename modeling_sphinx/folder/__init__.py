"""A SPHINX model folder: making one, converting one from the original checkpoints, writing it safely, describing
it in its card, publishing it.

- `create`: a folder from a model and processor (`save_model_folder`), or a random one of a variant (`init_model`);
- `convert`: the original LLaMA2-Accessory checkpoints into a folder, by a declarative key table;
- `tokenizer`: SPHINX's tokenizer from a SentencePiece model, and the tiny one of random folders;
- `card`: the model card rendered from `model_card.md` and the folder's config;
- `publish`: `sphinx-mllm push`, the Hub upload of a checked folder;
- `shards`, `atomic`, `dtypes`: safetensors read and written one tensor at a time, output folders that appear only
  when complete, and the dtypes that commands name as text.

May import the model files, `processing` and each other; never the tools (training, evaluation, serving, the
miniature). `shards`, `atomic` and `dtypes` import no model code, so that `sphinx-mllm mix` starts fast.
"""
