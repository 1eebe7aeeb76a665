"""`sphinx-mllm demo pretrain OUT`: the miniature's pretrained parts, made from the generated world.

SPHINX never starts from random weights: its LLM is a pretrained LLaMA-2 and its encoders come from three kinds
of pretraining (CLIP ViT-L/14 and OpenCLIP ConvNeXt-XXL contrastive against captions, DINOv2 ViT-g/14
self-supervised). This command makes miniature stand-ins the same ways, on scenes of `world.render` in both
domains, with objectives that know nothing of the demo's questions:

- the CLIP-style ViT and the ConvNeXt: contrastive (symmetric InfoNCE, learned temperature) against each scene's
  caption (`world.caption`), each with a small text tower trained alongside and then dropped;
- the DINOv2-style ViT: masked patch prediction, self-supervised (half of each view's patches are blanked to the
  mean colour and a linear head predicts their pixels from the encoder's tokens; the head is dropped);
- the LLaMA: next-token prediction on text alone (scene descriptions with their boxes, and questions about them
  answered in words), in SPHINX's chat template.

Every part has the architecture and sizes that `world.MINIATURE` gives `SphinxConfig`, and is pretrained through
the model's own view cutting and encoder calls, so its tensors load into `SphinxForConditionalGeneration` under
their own names. Each part's pretraining is measured against the same part at its random initialisation:
encoders by a linear probe of their global-view tokens (the colour, kind and place of the shape in held-out
one-shape scenes), the LLM by its perplexity on held-out text.

`OUT` gets `parts.safetensors`, `tokenizer.model` (the 768-piece tokenizer the LLM was trained with) and
`manifest.json` (the command, seed, budget, time, peak memory and metrics). The package ships one such folder
(`modeling_sphinx/miniature/pretrained/`), made by the command its manifest records.
"""

import json
import logging
import random
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..folder.atomic import atomic_output_dir, refuse_non_empty
from ..processing.tasks_sphinx import format_box
from .world import COLOURS, DOMAINS, HEIGHT, MINIATURE, MINIATURE_VOCABULARY, SHAPES, WIDTH, caption, place, render

logger = logging.getLogger(__name__)
SHIPPED = Path(__file__).resolve().parent / "pretrained"
# what a probe reads from an encoder's tokens of a one-shape scene (None: the classes seen in the data)
PROBED = {"colour": list(COLOURS), "kind": list(SHAPES), "place": None}
ENCODERS = ("clip", "convnext", "dinov2")
PROBE_SEED = 20_000_000  # scenes from here on are never trained on
TEXT_SEED = 30_000_000


@dataclass(frozen=True)
class PretrainBudget:
    """Scenes, steps and batch sizes of one pretraining run."""

    scenes_per_domain: int
    probe_scenes_per_domain: int  # half to fit the probe, half to score it
    contrastive_steps: int
    masked_steps: int
    language_steps: int
    batch_size: int = 64  # images per contrastive or masked-prediction step
    language_batch_size: int = 32  # texts per language-model step (about 200 tokens each)
    learning_rate: float = 2e-3


FULL_PRETRAINING = PretrainBudget(
    scenes_per_domain=1500, probe_scenes_per_domain=300, contrastive_steps=1200, masked_steps=1200, language_steps=1500
)
QUICK_PRETRAINING = PretrainBudget(
    scenes_per_domain=24,
    probe_scenes_per_domain=24,
    contrastive_steps=3,
    masked_steps=3,
    language_steps=3,
    batch_size=8,
)


def init_miniature(out: Path, seed: int = 0, encoders: tuple[str, ...] = ENCODERS, **overrides) -> Path:
    """Write a randomly initialised miniature (`world.MINIATURE` with `overrides`) with its tokenizer to `out`,
    reading through `encoders` (all three by default; fewer for an ablation of the visual-embedding mix)."""
    unknown = set(encoders) - set(ENCODERS)
    if unknown or not encoders:
        raise ValueError(f"encoders are one or more of {ENCODERS}, got {encoders}")
    dropped = {f"{name}_config": None for name in ENCODERS if name not in encoders}
    from ..folder.create import init_model
    from ..folder.tokenizer import train_tiny_sentencepiece

    with tempfile.TemporaryDirectory() as scratch:  # init_model copies the tokenizer into the model folder
        # pieces learned from the template and the task prompts: the system prompt is 31 tokens, not 68
        tokenizer = Path(scratch) / "tokenizer.model"
        tokenizer.write_bytes(train_tiny_sentencepiece(vocab_size=MINIATURE_VOCABULARY))
        config = MINIATURE | dropped | overrides
        return init_model("sphinx-1k", out, tiny=True, tokenizer_model=tokenizer, seed=seed, **config)


@dataclass
class Scenes:
    """Rendered scenes as the encoders see them: every view (global first) and ConvNeXt's own views."""

    views: torch.Tensor  # [N * 5, 3, 112, 112], kept in float16 to halve the memory
    convnext_views: torch.Tensor  # [N * 5, 3, 128, 128] float16
    captions: list[str]
    labels: dict[str, list[str]]  # probe targets per scene

    @property
    def num_views(self) -> int:
        return self.views.shape[0] // len(self.captions)


def render_scenes(processor, model, seeds: list[tuple[int, str]], batch_size: int = 64) -> Scenes:
    views, convnext_views, captions, labels = [], [], [], {name: [] for name in PROBED}
    for start in range(0, len(seeds), batch_size):
        images = []
        for seed, domain in seeds[start : start + batch_size]:
            image, shapes, dot = render(seed, domain)
            images.append(image)
            captions.append(caption(shapes, dot, domain))
            first = shapes[0]
            labels["colour"].append(first["colour"])
            labels["kind"].append(first["kind"])
            labels["place"].append(place(first["box"]))
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            batch_views, batch_convnext = model.model.cut_views(pixels)
        views.append(batch_views.half())
        convnext_views.append(batch_convnext.half())
    return Scenes(torch.cat(views), torch.cat(convnext_views), captions, labels)


def encoder_tokens(model, name: str, views: torch.Tensor, convnext_views: torch.Tensor) -> torch.Tensor:
    """One encoder's tokens of `views`, called as `SphinxModel.get_image_features` calls it."""
    sphinx = model.model
    views = views.float()
    if name == "clip":
        return sphinx.clip.forward_features(views)
    if name == "convnext":
        return sphinx.convnext_tokens(views, convnext_views.float())
    return sphinx.dinov2.forward_features(sphinx.to_dinov2_statistics(views))


class TextTower(nn.Module):
    """A 2-layer transformer over caption tokens, mean-pooled: the contrastive partner, dropped afterwards."""

    def __init__(self, vocab_size: int, width: int = 64, max_length: int = 96):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(ids) + self.position[: ids.shape[1]], src_key_padding_mask=~mask)
        return self.norm((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def _adamw(parameters, learning_rate: float, steps: int):
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.1, 1 - step / max(steps, 1))
    )
    return optimizer, schedule


def _step(optimizer, schedule, loss: torch.Tensor, parameters, losses: list[float]):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    losses.append(loss.item())


def _first_and_last(losses: list[float], window: int = 20) -> dict[str, float]:
    """The mean loss of the first and of the last `window` steps."""
    window = max(1, min(window, len(losses) // 2))
    return {"first": round(sum(losses[:window]) / window, 4), "last": round(sum(losses[-window:]) / window, 4)}


def pretrain_contrastive(
    model, tokenizer, scenes: Scenes, name: str, budget: PretrainBudget, seed: int
) -> dict[str, float]:
    """CLIP-style pretraining of one encoder on the global views against their captions; returns its first and last losses."""
    losses = []
    encoder = getattr(model.model, name)
    torch.manual_seed(seed)
    text = TextTower(len(tokenizer))
    ids = tokenizer(scenes.captions, padding=True, return_tensors="pt")
    tokens = encoder_tokens(model, name, scenes.views[:1], scenes.convnext_views[:1])
    image_head = nn.Linear(tokens[0].numel(), 64)
    text_head = nn.Linear(64, 64)
    logit_scale = nn.Parameter(torch.tensor(2.66))  # ln(1 / 0.07), CLIP's initial temperature
    parameters = [*encoder.parameters(), *text.parameters(), *image_head.parameters(), *text_head.parameters()]
    parameters.append(logit_scale)
    optimizer, schedule = _adamw(parameters, budget.learning_rate, budget.contrastive_steps)
    generator = torch.Generator().manual_seed(seed)
    global_views = torch.arange(0, scenes.views.shape[0], scenes.num_views)
    encoder.requires_grad_(True).train()  # the miniature's config freezes its encoders, as SPHINX's tuning does
    for _ in range(budget.contrastive_steps):
        batch = torch.randperm(len(scenes.captions), generator=generator)[: budget.batch_size]
        rows = global_views[batch]
        image = F.normalize(
            image_head(encoder_tokens(model, name, scenes.views[rows], scenes.convnext_views[rows]).flatten(1)), dim=-1
        )
        words = F.normalize(text_head(text(ids["input_ids"][batch], ids["attention_mask"][batch].bool())), dim=-1)
        logits = image @ words.T * logit_scale.clamp(max=4.6).exp()
        targets = torch.arange(len(batch))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        _step(optimizer, schedule, loss, parameters, losses)
    encoder.requires_grad_(False).eval()
    return _first_and_last(losses)


def pretrain_masked(
    model, scenes: Scenes, budget: PretrainBudget, seed: int, mask_ratio: float = 0.5
) -> dict[str, float]:
    """Masked patch prediction for the DINOv2-style ViT on every view; returns its first and last losses."""
    losses = []
    encoder = model.model.dinov2
    patch = model.config.patch_size
    side = model.config.view_size // patch
    torch.manual_seed(seed)
    head = nn.Linear(encoder.num_features, 3 * patch * patch)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer, schedule = _adamw(parameters, budget.learning_rate, budget.masked_steps)
    generator = torch.Generator().manual_seed(seed)
    encoder.requires_grad_(True).train()
    for _ in range(budget.masked_steps):
        rows = torch.randperm(scenes.views.shape[0], generator=generator)[: budget.batch_size]
        views = scenes.views[rows].float()
        masked = torch.rand(len(rows), side * side, generator=generator) < mask_ratio
        pixel_mask = masked.view(-1, 1, side, side).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        corrupted = views.masked_fill(pixel_mask, 0.0)  # 0 is the mean colour of the normalised pixels
        tokens = encoder.forward_features(model.model.to_dinov2_statistics(corrupted))[:, encoder.num_prefix_tokens :]
        target = (
            views.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        )
        loss = F.mse_loss(head(tokens)[masked], target[masked])
        _step(optimizer, schedule, loss, parameters, losses)
    encoder.requires_grad_(False).eval()
    return _first_and_last(losses)


def conversations(seeds: list[tuple[int, str]]) -> list[list[dict]]:
    """Text-only conversations about scenes described in words: the LLM's pretraining corpus."""
    corpus = []
    for seed, domain in seeds:
        _, shapes, dot = render(seed, domain)
        rng = random.Random(f"text-{seed}-{domain}")
        size = (HEIGHT, WIDTH)
        scene = ", ".join(f"a {s['colour']} {s['kind']} {format_box(s['box'], size)}" for s in shapes)
        described = f"In the picture there is {scene} and a small {dot['colour']} dot {format_box(dot['box'], size)}."
        target = rng.choice(shapes)
        question, answer = rng.choice(
            [
                (f"What colour is the {target['kind']}?", target["colour"]),
                (f"Where is the {target['colour']} {target['kind']}?", format_box(target["box"], size)),
                ("What colour is the small dot?", dot["colour"]),
                ("Describe the picture.", caption(shapes, dot, domain).capitalize() + "."),
            ]
        )
        corpus.append(
            [
                {"role": "user", "content": [{"type": "text", "text": f"{described} {question}"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        )
    return corpus


def _encode_texts(processor, seeds) -> dict[str, torch.Tensor]:
    texts = [processor.apply_chat_template(c, tokenize=False) for c in conversations(seeds)]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # positions from 0 in every row, as in use
    try:
        encoded = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def _rows(texts: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """Some rows of right-padded texts, cut to their longest."""
    length = int(texts["attention_mask"][rows].sum(1).max())
    return {k: v[rows, :length] for k, v in texts.items()}


def perplexity(model, texts: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, texts["input_ids"].shape[0], batch_size):
            batch = _rows(texts, slice(start, start + batch_size))
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return float(torch.tensor(total / count).exp())


def pretrain_language(model, texts: dict[str, torch.Tensor], budget: PretrainBudget, seed: int) -> dict[str, float]:
    """Next-token prediction of the LLM on text alone; returns its first and last losses."""
    losses = []
    parameters = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    optimizer, schedule = _adamw(parameters, budget.learning_rate, budget.language_steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(budget.language_steps):
        rows = torch.randperm(texts["input_ids"].shape[0], generator=generator)[: budget.language_batch_size]
        loss = model(**_rows(texts, rows)).loss
        _step(optimizer, schedule, loss, parameters, losses)
    model.eval()
    return _first_and_last(losses)


def probe(model, name: str, fit: Scenes, score: Scenes, steps: int = 300) -> dict[str, float]:
    """Held-out accuracy of a linear probe of one encoder's global-view tokens, per probed property."""

    def features(scenes: Scenes) -> torch.Tensor:
        rows = torch.arange(0, scenes.views.shape[0], scenes.num_views)
        with torch.no_grad():
            return encoder_tokens(model, name, scenes.views[rows], scenes.convnext_views[rows]).flatten(1)

    train, test = features(fit), features(score)
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    accuracy = {}
    for prop, classes in PROBED.items():
        classes = classes or sorted(set(fit.labels[prop]))
        index = {c: i for i, c in enumerate(classes)}
        y_train = torch.tensor([index[v] for v in fit.labels[prop]])
        y_test = torch.tensor([index.get(v, -1) for v in score.labels[prop]])
        torch.manual_seed(0)
        linear = nn.Linear(train.shape[1], len(classes))
        optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(linear(train), y_train).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy[prop] = round(float((linear(test).argmax(-1) == y_test).float().mean()), 4)
    return accuracy


def _single_shape_seeds(first: int, count: int, domain: str) -> list[tuple[int, str]]:
    """The first `count` scenes from seed `first` on with one shape, whose colour, kind and place are unambiguous."""
    seeds, seed = [], first
    while len(seeds) < count:
        if len(render(seed, domain)[1]) == 1:
            seeds.append((seed, domain))
        seed += 1
    return seeds


def _probe_sets(processor, model, budget: PretrainBudget) -> tuple[Scenes, Scenes]:
    half = budget.probe_scenes_per_domain // 2
    scenes = {d: _single_shape_seeds(PROBE_SEED, 2 * half, d) for d in DOMAINS}
    fit = [seed for d in DOMAINS for seed in scenes[d][:half]]
    score = [seed for d in DOMAINS for seed in scenes[d][half:]]
    return render_scenes(processor, model, fit), render_scenes(processor, model, score)


def _training_texts(processor, budget: PretrainBudget) -> dict[str, torch.Tensor]:
    return _encode_texts(processor, [(TEXT_SEED + i, d) for d in DOMAINS for i in range(budget.scenes_per_domain)])


def _held_out_texts(processor, budget: PretrainBudget) -> dict[str, torch.Tensor]:
    return _encode_texts(
        processor, [(PROBE_SEED + i, d) for d in DOMAINS for i in range(budget.probe_scenes_per_domain)]
    )


# the pretrained parts, by their `SphinxForConditionalGeneration` names; the projector and start/end embeddings
# are what stage 1 trains from scratch, as in SPHINX
PART_PREFIXES = ("model.clip.", "model.convnext.", "model.dinov2.", "model.language_model.", "lm_head.")


def part_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(PART_PREFIXES)}


@dataclass
class Measurement:
    """The held-out sets every part is measured on, made once per run."""

    fit: Scenes
    score: Scenes
    texts: dict[str, torch.Tensor]

    @classmethod
    def make(cls, processor, model, budget: PretrainBudget) -> "Measurement":
        fit, score = _probe_sets(processor, model, budget)
        return cls(fit, score, _held_out_texts(processor, budget))

    def __call__(self, model) -> dict:
        """Every part's metrics: probe accuracies of the encoders, held-out perplexity of the LLM."""
        metrics = {name: probe(model, name, self.fit, self.score) for name in ENCODERS}
        metrics["llm"] = {"held_out_perplexity": round(perplexity(model, self.texts), 3)}
        return metrics


def pretrain(out: str | Path, quick: bool = False, seed: int = 0, progress=None) -> Path:
    """Pretrain the miniature's parts into `out` (written atomically); returns `out`. `progress` gets a line per
    finished part (default: the module's logger)."""
    from safetensors.torch import save_file

    from ..folder.tokenizer import train_tiny_sentencepiece
    from ..inference import load_pretrained

    budget = QUICK_PRETRAINING if quick else FULL_PRETRAINING
    progress = progress or logger.info
    started = time.perf_counter()
    out = refuse_non_empty(out)
    with tempfile.TemporaryDirectory() as scratch:
        processor, model = load_pretrained(str(init_miniature(Path(scratch) / "init", seed)), dtype="float32")
    torch.manual_seed(seed)
    train_seeds = [(i, d) for d in DOMAINS for i in range(budget.scenes_per_domain)]
    scenes = render_scenes(processor, model, train_seeds)
    texts = _training_texts(processor, budget)
    progress(f"rendered {len(train_seeds)} scenes and {texts['input_ids'].shape[0]} texts")
    measure = Measurement.make(processor, model, budget)
    random_init = measure(model)
    losses = {}
    for name in ("clip", "convnext"):
        losses[name] = pretrain_contrastive(model, processor.tokenizer, scenes, name, budget, seed)
        progress(f"{name}: contrastive loss {losses[name]['first']:.3f} -> {losses[name]['last']:.3f}")
    losses["dinov2"] = pretrain_masked(model, scenes, budget, seed)
    progress(f"dinov2: masked-prediction loss {losses['dinov2']['first']:.3f} -> {losses['dinov2']['last']:.3f}")
    losses["llm"] = pretrain_language(model, texts, budget, seed)
    progress(f"llm: language-model loss {losses['llm']['first']:.3f} -> {losses['llm']['last']:.3f}")
    metrics = measure(model)
    manifest = {
        "command": f"sphinx-mllm demo pretrain OUT --seed {seed}" + (" --quick" if quick else ""),
        "seed": seed,
        "budget": asdict(budget),
        "miniature": MINIATURE,
        "losses": losses,  # each part's pretraining loss over its first and last 20 steps
        "metrics": metrics,
        "metrics_at_random_init": random_init,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_output_dir(out) as staging:
        save_file(part_tensors(model), staging / "parts.safetensors", metadata={"format": "pt"})
        (staging / "tokenizer.model").write_bytes(train_tiny_sentencepiece(vocab_size=MINIATURE_VOCABULARY))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_parts(model, folder: str | Path = SHIPPED):
    """Copy pretrained parts into a miniature; every tensor of the parts must match one of the model's, except
    those of encoders the miniature was built without."""
    absent = tuple(f"model.{name}." for name in ENCODERS if getattr(model.config, f"{name}_config") is None)
    parts = {k: v for k, v in load_file(Path(folder) / "parts.safetensors").items() if not k.startswith(absent)}
    unexpected = model.load_state_dict(parts, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{folder}: tensors the model does not have: {unexpected[:5]}")
    return model
