"""Publish a SPHINX model folder to the Hugging Face Hub in one commit, with remote code and a rendered card.

Everything is checked before anything is sent: the repo id, the weights (every shard the index names, read in full
and finite), the
processor and tokenizer files, and that every `auto_map` entry points at a code file in the folder. The token
comes from huggingface_hub's usual sources (`token=`, `HF_TOKEN`, `hf auth login`) and is never printed.
"""

import json
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SKIPPED = ("README.md",)


def _auto_map_modules(data: dict) -> set[str]:
    modules = set()
    for key, value in data.items():
        if key == "auto_map" and isinstance(value, dict):
            for reference in value.values():
                # one class, a (slow, fast) tokenizer pair, or a {backend: class} map of image processors
                if isinstance(reference, dict):
                    references = list(reference.values())
                elif isinstance(reference, (list, tuple)):
                    references = reference
                else:
                    references = [reference]
                for ref in references:
                    if ref:
                        modules.add(ref.split("--")[-1].split(".")[0] + ".py")
        elif isinstance(value, dict):
            modules |= _auto_map_modules(value)
    return modules


def check_folder(folder: str | Path) -> list[Path]:
    """The files to upload, after checking that the folder is a complete SPHINX model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ValueError(f"{folder}: the weight index names shards that are missing: {missing}")
    elif not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")
    for name in ("config.json", "generation_config.json", *PROCESSOR_FILES):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: missing {name} (save the processor and generation config with the model)")
    needed = set()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        needed |= _auto_map_modules(json.loads((folder / name).read_text()))
    if not needed:
        raise ValueError(f"{folder}/config.json has no auto_map: the repo would not load without this package")
    missing_code = sorted(m for m in needed if not (folder / m).is_file())
    if missing_code:
        raise ValueError(f"{folder}: auto_map points at remote-code files that are missing: {missing_code}")
    from .shards import check_weights  # torch: only once the folder is known to be a model's

    check_weights(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in SKIPPED)


def card_for_push(folder: Path, repo_id: str, license: str | None = None) -> ModelCard:
    """Re-render the folder's card (or a new one) for `repo_id`, keeping what the existing card records."""
    from .card import read_card_facts, render_model_card  # reads the config with transformers (and so torch)

    provenance, kwargs = read_card_facts(folder)
    if license is not None:
        kwargs["license"] = license
    return render_model_card(folder, provenance, repo_id=repo_id, **kwargs)


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    license: str | None = None,
):
    """Upload `folder` to `repo_id` in one commit; returns huggingface_hub's `CommitInfo`."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"malformed repo id {repo_id!r}: {error}") from None
    if "/" not in repo_id:
        raise ValueError(f"malformed repo id {repo_id!r}: use 'namespace/name'")
    folder = Path(folder)
    files = check_folder(folder)
    card = card_for_push(folder, repo_id, license)
    api = HfApi(token=token, library_name="sphinx-mllm")
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    try:
        card.validate()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload SPHINX model ({len(operations)} files) with sphinx-mllm",
            revision=revision,
        )
    except (OSError, httpx2.TransportError) as error:  # offline mode, DNS, refused or dropped connections
        raise ValueError(f"cannot reach the Hub at {api.endpoint}: {error}") from None
    except HfHubHTTPError as error:
        raise ValueError(f"the Hub refused the upload to {repo_id!r}: {str(error).splitlines()[0]}") from None
