import base64
import json
import subprocess
import sys
import textwrap

import httpx2
import pytest
import torch
from huggingface_hub import ModelCard, constants, set_client_factory
from huggingface_hub.utils._http import hf_request_event_hook
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_sphinx import SphinxConfig, SphinxForConditionalGeneration
from modeling_sphinx.cli import main
from modeling_sphinx.folder.card import ENCODER_NAMES, TEMPLATE, render_model_card
from modeling_sphinx.folder.create import init_model
from modeling_sphinx.folder.publish import push_folder

from .helpers import IMAGES, REPO

TOKEN = "hf_test_secret_token_1234567890"


class FakeHub:
    """A Hub answering over a mock HTTP transport: records requests and the files of each commit."""

    def __init__(self):
        self.requests = []
        self.commits = []
        self.card_checks = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        host = f"{request.url.scheme}://{request.url.host}"
        path = request.url.path
        self.requests.append((request.method, path, request.headers.get("authorization")))
        if path == "/api/validate-yaml":
            self.card_checks.append(json.loads(request.content))
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body.get('organization') or 'user'}/{body['name']}"
            return httpx2.Response(200, json={"url": f"{host}/{repo}", "name": repo, "id": "1"})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            files = {
                entry["value"]["path"]: base64.b64decode(entry["value"]["content"])
                for entry in lines
                if entry["key"] == "file"
            }
            header = next(entry["value"] for entry in lines if entry["key"] == "header")
            self.commits.append({"path": path, "header": header, "files": files})
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return httpx2.Response(200, json={"commitUrl": f"{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": f"unexpected {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub.handler), event_hooks={"request": [hf_request_event_hook]}
        )
    )
    yield hub
    set_client_factory(lambda: httpx2.Client(event_hooks={"request": [hf_request_event_hook]}))


@pytest.mark.slow
def test_push_uploads_the_complete_folder_in_one_commit(tiny_model_dir, fake_hub, tmp_path, capsys):
    folder = tiny_model_dir("sphinx-tiny")
    code = main(["push", str(folder), "--repo-id", "me/sphinx-tiny-test", "--revision", "dev", "--license", "llama2"])
    assert code == 0
    (commit,) = fake_hub.commits
    assert commit["path"] == "/api/models/me/sphinx-tiny-test/commit/dev"
    assert sorted(commit["files"]) == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "configuration_sphinx.py",
        "generation_config.json",
        "image_processing_sphinx.py",
        "model.safetensors",
        "modeling_sphinx.py",
        "processing_sphinx.py",
        "processor_config.json",
        "tasks_sphinx.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "llama2" and "custom_code" in card.data.tags
    assert card.data.to_dict()["sphinx_mllm"] == {"kind": "initialised"}
    assert 'from_pretrained("me/sphinx-tiny-test"' in card.content
    assert fake_hub.card_checks, "the card was validated before the upload"
    config = json.loads(commit["files"]["config.json"])
    for reference in config["auto_map"].values():
        assert reference.split(".")[0] + ".py" in commit["files"]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests if auth)
    output = capsys.readouterr()
    assert TOKEN not in output.out + output.err + card.content

    # what was pushed loads as remote code without this package and gives the package's logits
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, content in commit["files"].items():
        (pushed / name).write_bytes(content)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = processor(text="<image>What is it?", images=Image.open(IMAGES / "page.png"), return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits[0, -2:].tolist()
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["modeling_sphinx"] = None
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(pushed)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(pushed)!r}, trust_remote_code=True)
        inputs = processor(text="<image>What is it?", images=Image.open({str(IMAGES / "page.png")!r}), return_tensors="pt")
        with torch.no_grad():
            print(json.dumps(model(**inputs).logits[0, -2:].tolist()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(
        torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), torch.tensor(expected), atol=1e-5
    )


def _copy(folder, tmp_path, drop=()):
    target = tmp_path / "copy"
    target.mkdir()
    for path in folder.iterdir():
        if path.name not in drop:
            (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize(
    "drop,message",
    [
        (("model.safetensors",), "no weights"),
        (("processor_config.json",), "missing processor_config.json"),
        (("tokenizer.json",), "missing tokenizer.json"),
        (("modeling_sphinx.py",), "remote-code files that are missing: \\['modeling_sphinx.py'\\]"),
    ],
)
def test_bad_folders_fail_before_any_request(tiny_model_dir, fake_hub, tmp_path, drop, message):
    folder = _copy(tiny_model_dir("sphinx-tiny"), tmp_path, drop)
    with pytest.raises(ValueError, match=message):
        push_folder(folder, "me/repo")
    assert fake_hub.requests == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "me/bad name", "a/b/c", "me/" + "x" * 200])
def test_malformed_repo_ids(tiny_model_dir, fake_hub, repo_id):
    with pytest.raises(ValueError, match="malformed repo id"):
        push_folder(tiny_model_dir("sphinx-tiny"), repo_id)
    assert fake_hub.requests == []


def test_card_of_a_reduced_size_model_states_its_own_numbers(tmp_path):
    """The demo's miniature: 28-px patches, no Q-Former, every width reduced."""
    encoder = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 112, "patch_size": 28}
    folder = init_model(
        "sphinx-1k",
        tmp_path / "miniature",
        tiny=True,
        image_size=224,
        view_size=112,
        patch_size=28,
        convnext_view_size=128,
        qformer_config=None,
        clip_config={"architecture": "vit_large_patch14_clip_224", "model_args": encoder},
        dinov2_config={"architecture": "vit_giant_patch14_dinov2", "model_args": {**encoder, "embed_dim": 24}},
    )
    card = ModelCard.load(folder / "README.md").content
    model = SphinxForConditionalGeneration.from_pretrained(folder).model
    config = model.config
    assert (config.num_views, config.tokens_per_view, config.num_image_tokens) == (5, 19, 95)
    assert "\n# miniature\n" in card and "Variant:" not in card
    assert "A reduced-size model with the architecture of `sphinx-1k`, not the release itself." in card
    assert "5 views (a global view plus 4 sub-images) of 112 px (128 px for ConvNeXt) in 28-px patches" in card
    assert "95 visual tokens per image, 19 per view" in card
    text = config.text_config
    assert f"llama decoder (not a released size), {text.num_hidden_layers} layers of width {text.hidden_size}" in card
    for name in ("clip", "convnext", "dinov2"):
        width = getattr(model, name).num_features
        assert f"{ENCODER_NAMES[name]} architecture at reduced size (feature width {width})" in card
    assert "Q-Former" not in card


def test_card_of_a_released_size_config_names_the_release(tmp_path):
    SphinxConfig.from_variant("sphinx-1k").save_pretrained(tmp_path / "full")
    card = render_model_card(tmp_path / "full", {"kind": "initialised"}).content
    assert "\n# sphinx-1k\n" in card and "Variant: `sphinx-1k`." in card and "reduced" not in card
    assert "LLaMA-2-13B, 40 layers of width 5120" in card
    assert "CLIP ViT-L/14 (feature width 1024), OpenCLIP ConvNeXt-XXL (feature width 3072)" in card
    assert "DINOv2 ViT-g/14 (feature width 1536), concatenated channel-wise (width 5632)" in card
    assert "BLIP-2 ViT-g/14 + Q-Former, whose 32 query tokens of width 768" in card
    assert "5 views (a global view plus 4 sub-images) of 224 px in 14-px patches" in card
    assert "1455 visual tokens per image, 291 per view" in card


def test_card_records_no_local_path(tiny_model_dir, tmp_path, monkeypatch):
    folder = tiny_model_dir("sphinx-tiny")
    (tmp_path / "runs" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for local in (str(folder), "runs/base"):
        provenance = {"kind": "fine-tuned", "base_model": local, "tuning": "lora"}
        card = str(render_model_card(folder, provenance, base_models=[local]))
        assert local not in card and str(tmp_path) not in card
        assert ModelCard(card).data.to_dict()["sphinx_mllm"] == {"kind": "fine-tuned", "tuning": "lora"}
    hub = {"kind": "fine-tuned", "base_model": "Alpha-VLLM/SPHINX", "tuning": "full"}
    card = render_model_card(folder, hub, base_models=["Alpha-VLLM/SPHINX"])
    assert card.data.to_dict()["sphinx_mllm"] == hub and card.data.base_model == ["Alpha-VLLM/SPHINX"]


@pytest.mark.parametrize("name", ["model", "mix-0.5", ".hidden", "a.partial"])
def test_a_folder_being_written_knows_its_published_name(tmp_path, name):
    from modeling_sphinx.folder.atomic import atomic_output_dir, published_name

    with atomic_output_dir(tmp_path / name) as staging:
        assert staging.name != name and published_name(staging) == name
    assert published_name(tmp_path / name) == name


def test_the_card_template_is_the_repository_model_card():
    """One template: the package's is a link to the top-level `model_card.md`, never a copy that could drift."""
    assert TEMPLATE.is_symlink() and TEMPLATE.resolve() == (REPO / "model_card.md").resolve()
