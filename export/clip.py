"""Zero-shot CLIP classifiers (paper A.1.1) as ordinary serving classifiers.

SPEC forms:
  clip:<dir or hub id>          a Hugging Face `transformers` CLIPModel (`save_pretrained` folder, or a hub
                                id such as openai/clip-vit-base-patch32), its tokenizer from the same place
  open_clip:<name>[@<tag>]      an open_clip model by name, with a pretrained tag (`open_clip:ViT-B-32@openai`)
  open_clip:hf-hub:<org/repo>   an open_clip model from the hub
  open_clip:local-dir:<dir>     an open_clip folder (open_clip_config.json and its weights)

The class names (the label file) and the prompt templates ("a photo of a {}.") are turned into one text
embedding per class when the model is exported: each prompt is embedded, the embeddings are normalised
and averaged over the templates, and the mean is normalised again (the recipe of OpenAI's CLIP
repository). They are baked into the graph as a constant, so the exported file holds the image tower
only and answers like any classifier: logits = logit_scale * cos(image embedding, class embedding),
the model's own logit scale, then softmax (ServingWrapper).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from littlebig.labels import ClassLabels

from .specs import (
    ExportError,
    LoadedModel,
    ModelInfo,
    _load_weights,
    _use_local_cache_if_hub_unreachable,
)

# OpenAI CLIP's normalisation, the default of CLIPImageProcessor and of open_clip.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
PROMPT_BATCH = 256


class ZeroShotClassifier(nn.Module):
    """Normalised pixels [N, 3, R, R] -> logits [N, C]: the scaled cosine similarity of the image embedding
    with each class's text embedding."""

    def __init__(self, image_tower: nn.Module, class_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.image_tower = image_tower
        self.register_buffer("class_embeddings", class_embeddings.float())  # [C, D], unit rows
        self.logit_scale = float(logit_scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.image_tower(pixels).float()
        image = image / image.norm(dim=-1, keepdim=True)
        return self.logit_scale * image @ self.class_embeddings.T


class HFImageTower(nn.Module):
    """A transformers CLIPModel's vision tower and projection (its get_image_features)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)


def read_templates(path: str | Path | None) -> tuple[str, ...]:
    """Prompt templates, one per line, each with one ``{}`` where the class name goes."""
    if path is None:
        return DEFAULT_TEMPLATES
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"prompt template file {path} does not exist")
    templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ExportError(f"{path}: each line must be a prompt with one {{}} for the class name, like 'a photo of a {{}}.'"
                          + (f"; got {bad[0]!r}" if bad else "; the file is empty"))
    return templates


def class_embeddings(encode_text, tokenize, names: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
    """One unit-norm text embedding per class: the normalised mean of its normalised prompt embeddings."""
    prompts = [template.format(name.replace("_", " ")) for name in names for template in templates]
    embedded = []
    with torch.no_grad():
        for start in range(0, len(prompts), PROMPT_BATCH):
            text = encode_text(tokenize(prompts[start : start + PROMPT_BATCH])).float()
            embedded.append(text / text.norm(dim=-1, keepdim=True))
    per_class = torch.cat(embedded).view(len(names), len(templates), -1).mean(dim=1)
    return per_class / per_class.norm(dim=-1, keepdim=True)


def _hf_preprocessing(source: str, image_size: int) -> tuple[int, tuple, tuple, float]:
    """Resolution, mean, std and crop_pct from the folder's preprocessor_config.json (CLIPImageProcessor),
    else OpenAI CLIP's (shorter side to the resolution, centre crop)."""
    config = Path(source) / "preprocessor_config.json"
    if not config.is_file():
        return image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1.0
    data = json.loads(config.read_text())
    crop = data.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    short = data.get("size", crop)
    short = short.get("shortest_edge", crop) if isinstance(short, dict) else int(short)
    return int(crop), tuple(data.get("image_mean", OPENAI_CLIP_MEAN)), tuple(data.get("image_std", OPENAI_CLIP_STD)), crop / short


def _load_hf(source: str, random_init: bool, weights: str | None = None):
    """A CLIPModel's image tower, encode_text, tokenize, the whole model, and (resolution, mean, std, crop_pct)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    if random_init or weights:  # the architecture only: --weights fills it
        model = CLIPModel(CLIPConfig.from_pretrained(source))
    else:
        model = CLIPModel.from_pretrained(source)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)

    def tokenize(prompts):
        return tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")

    def encode_text(tokens):
        output = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return model.text_projection(output.pooler_output)

    preprocessing = _hf_preprocessing(source, model.config.vision_config.image_size)
    return HFImageTower(model), encode_text, tokenize, model, preprocessing


def _load_open_clip(name: str, random_init: bool, weights: str | None = None):
    """As _load_hf, for an open_clip model (NAME@TAG, hf-hub:ORG/REPO or local-dir:DIR)."""
    import open_clip

    name, _, tag = name.partition("@")
    schema = name.split(":", 1)[0] if ":" in name else None
    if tag and schema:
        raise ExportError(f"open_clip:{name} brings its own weights: leave out @{tag}")
    if not (tag or schema or random_init or weights):
        raise ExportError(f"open_clip:{name} names an architecture only: add a pretrained tag (open_clip:{name}@openai; "
                          "open_clip.list_pretrained() lists them), or pass --weights FILE or --random-init")
    own_weights = not (random_init or weights)
    # require_pretrained: a folder or hub repo without weights fails instead of initialising at random.
    model = open_clip.create_model(name, pretrained=(tag or None) if own_weights else None, load_weights=own_weights,
                                   require_pretrained=own_weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    cfg = getattr(model.visual, "preprocess_cfg", {})
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    preprocessing = int(size), tuple(cfg.get("mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("std", OPENAI_CLIP_STD)), 1.0
    return model.visual, model.encode_text, tokenizer, model, preprocessing


@contextlib.contextmanager
def _load_errors(spec: str, random_init: bool):
    """A missing package, model, folder or hub access becomes one ExportError that says what to do."""
    try:
        yield
    except ExportError:
        raise
    except ImportError as err:
        raise ExportError(f"{spec} needs the {err.name} package: pip install 'littlebig[export]'") from err
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        untrained = "" if random_init else "; or pass --random-init to export an untrained model on purpose"
        raise ExportError(
            f"could not load {spec}: {first}. Without the model hub, download the model folder elsewhere "
            "(e.g. `hf download openai/clip-vit-base-patch32 --local-dir DIR`) and pass clip:DIR (transformers) or "
            f"open_clip:local-dir:DIR (open_clip){untrained}"
        ) from err


def _from_hub(family: str, source: str, random_init: bool, weights: str | None) -> bool:
    """Whether loading asks the model hub (a hub id, an open_clip tag or hf-hub: name), not a local folder."""
    if family == "clip":
        return not Path(source).is_dir()
    if source.startswith("local-dir:"):
        return False
    return source.startswith("hf-hub:") or ("@" in source and not (random_init or weights))


def load_clip(family: str, source: str, spec: str, *, weights: str | None, random_init: bool, labels: ClassLabels,
              templates: tuple[str, ...], allow_pickle: bool = False):
    """A zero-shot classifier over ``labels``' class names, as a LoadedModel like any other classifier."""
    if _from_hub(family, source, random_init, weights):
        _use_local_cache_if_hub_unreachable()
    with _load_errors(spec, random_init):
        loader = _load_hf if family == "clip" else _load_open_clip
        image_tower, encode_text, tokenize, model, (resolution, mean, std, crop_pct) = loader(source, random_init, weights)
    if weights:
        _load_weights(model, weights, allow_pickle)
    embeddings = class_embeddings(encode_text, tokenize, labels.names, templates)
    scale = float(model.logit_scale.detach().exp())
    module = ZeroShotClassifier(image_tower, embeddings, scale).eval()
    notes = {"zero_shot": json.dumps({"templates": list(templates), "logit_scale": scale, "embedding_dim": embeddings.shape[1]})}
    info = ModelInfo(
        spec=spec, resolution=resolution, mean=mean, std=std, num_classes=len(labels), crop_pct=crop_pct,
        weights=str(weights) if weights else ("random-init" if random_init else "pretrained"), labels=labels, notes=notes,
    )
    return LoadedModel(module, info)
