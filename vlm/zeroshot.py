"""Zero-shot labels from a CLIP or SigLIP checkpoint's own text half: no training, no VLM.

    vlm-zeroshot --tower T --image X [X or FOLDER ...] --labels "a cracked panel" "an intact panel"
    vlm-zeroshot --tower T --image FOLDER --labels-file labels.txt --template "a photo of {}"

Each image is scored against every label with the checkpoint's logit scale (and bias): CLIP-style towers
take a softmax over the labels (they compete: one of them holds), SigLIP-style towers a sigmoid per label
(each holds or not on its own, so several may). The activation follows the checkpoint (SiglipModel has a
logit bias, CLIPModel none; a tower folder may name its own in ``zeroshot.json``); ``--activation``
overrides it. Several ``--template``s average the labels' text embeddings, as CLIP's prompt ensembles do.
``--tower`` takes a whole CLIP/SigLIP folder or hub id, or a project model folder (its ``vision_tower``).
``python -m vlm.zeroshot`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from vlm.cli import DEMO_MODEL, ArgumentParser, UsageError, fail, require_model_folder, set_verbosity
from vlm.images import ImageError, load_image
from vlm.processor import load_image_processor

DEFAULT_TOWER = DEMO_MODEL
# How a tower folder whose weights do not say it scores (a CLIPModel trained with SigLIP's loss keeps its
# bias outside the model): {"activation": "sigmoid" | "softmax", "logit_bias": float}.
SETTINGS_FILE = "zeroshot.json"
ACTIVATIONS = ("softmax", "sigmoid")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIGLIP_TYPES = ("siglip", "siglip2")  # their text towers pool the last position: pad to the length they trained on
BATCH = 32
PROG = "vlm.zeroshot"  # the prefix of its error lines


class ZeroShotError(ValueError):
    """A tower or input that cannot be scored, with a message fit for one line."""


@dataclass
class ZeroShot:
    """A whole CLIP/SigLIP model with its tokenizer, image processor and scoring rule."""

    model: PreTrainedModel
    tokenizer: object
    image_processor: object
    activation: str
    logit_bias: float
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings, tokenized as the model family was trained."""
        text_config = self.model.config.text_config
        siglip = self.model.config.model_type in SIGLIP_TYPES
        inputs = self.tokenizer(list(texts), padding="max_length" if siglip else True, truncation=True,
                                max_length=text_config.max_position_embeddings, return_tensors="pt")
        eos = getattr(text_config, "eos_token_id", None)
        # CLIP pools at the first eos (at the largest id where a config has the legacy eos 2): texts must end in it.
        if not siglip and eos not in (None, 2) and not (inputs["input_ids"] == eos).any(1).all():
            raise ZeroShotError(f"the tokenizer of {self.source} does not end texts with the text tower's eos token "
                                f"(id {eos}): the text tower would read the wrong position")
        output = self.model.get_text_features(**inputs.to(self.device))
        return F.normalize(output.pooler_output.float(), dim=-1)

    @torch.no_grad()
    def embed_labels(self, labels: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """One unit vector per label: its text in every template, embedded, averaged, renormalized."""
        per_template = [self.embed_texts([template.replace("{}", label) for label in labels]) for template in templates]
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings, through the checkpoint's own image processor (PIL backend)."""
        rows = []
        for start in range(0, len(images), BATCH):
            inputs = self.image_processor(list(images[start:start + BATCH]), return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
            rows.append(self.model.get_image_features(**inputs).pooler_output.float())
        return F.normalize(torch.cat(rows), dim=-1)

    def logits(self, image_embeds: torch.Tensor, label_embeds: torch.Tensor) -> torch.Tensor:
        """[images, labels]: cosine similarity times the checkpoint's exp(logit scale), plus its bias."""
        scale = self.model.logit_scale.detach().float().exp().cpu()
        return scale * image_embeds.cpu() @ label_embeds.cpu().T + self.logit_bias

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()

    def score(self, images: Sequence[Image.Image], labels: Sequence[str],
              templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """Probabilities [images, labels]."""
        return self.probabilities(self.logits(self.embed_images(images), self.embed_labels(labels, templates)))


def tower_path(tower: str | Path) -> str:
    """A project model folder (model_type "vlm") stands for its vision tower; anything else is itself."""
    config_file = Path(tower) / "config.json"
    if config_file.is_file():
        try:
            values = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ZeroShotError(f"{config_file} is not valid JSON: {error}") from None
        if isinstance(values, dict) and values.get("model_type") == "vlm":
            inside = Path(tower) / str(values.get("vision_tower"))
            return str(inside) if inside.exists() else str(values.get("vision_tower"))
    return str(tower)


def read_settings(folder: str) -> dict:
    file = Path(folder) / SETTINGS_FILE
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ZeroShotError(f"{file} is not valid JSON: {error}") from None
    if (not isinstance(settings, dict) or settings.get("activation", "softmax") not in ACTIVATIONS
            or not isinstance(settings.get("logit_bias", 0.0), (int, float))):
        raise ZeroShotError(f"{file} must hold {{\"activation\": \"softmax\" | \"sigmoid\", \"logit_bias\": number}}")
    return settings


def write_settings(folder: str | Path, activation: str, logit_bias: float = 0.0) -> Path:
    """Record how a tower scores where its weights cannot say (a CLIPModel trained with SigLIP's loss)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    file = Path(folder) / SETTINGS_FILE
    file.write_text(json.dumps({"activation": activation, "logit_bias": float(logit_bias)}) + "\n")
    return file


def load_zero_shot(tower: str | Path, activation: str | None = None, device: str | torch.device = "cpu") -> ZeroShot:
    """A whole CLIP/SigLIP checkpoint (folder or hub id) ready to score; one-line ZeroShotError otherwise."""
    from vlm.loading import load_complete  # it refuses checkpoints that lack weights, in one line

    source = tower_path(tower)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ZeroShotError(f"cannot read a model config from {source}: {str(error).splitlines()[0]}") from None
    if getattr(config, "text_config", None) is None:
        kind = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise ZeroShotError(f"{source} holds only a vision model ({kind}), no text tower to score labels with: "
                            "pass a whole CLIP or SigLIP checkpoint")
    model = load_complete(AutoModel.from_pretrained, source, dtype=torch.float32)
    if not all(hasattr(model, name) for name in ("get_text_features", "get_image_features", "logit_scale")):
        raise ZeroShotError(f"{source} is a {type(model).__name__}, not a CLIP- or SigLIP-style image-text model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ZeroShotError(f"{source} has no usable tokenizer for its text tower: "
                            f"{str(error).splitlines()[0]}") from None
    tokenizer.padding_side = "right"  # both families were trained with the padding after the text
    settings = read_settings(source)
    own_bias = getattr(model, "logit_bias", None)
    chosen = activation or settings.get("activation") or ("sigmoid" if own_bias is not None else "softmax")
    if chosen not in ACTIVATIONS:
        raise ZeroShotError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {chosen!r}")
    bias = float(own_bias.detach().float().reshape(-1)[0]) if own_bias is not None else settings.get("logit_bias", 0.0)
    return ZeroShot(model.to(device).eval(), tokenizer, load_image_processor(source), chosen, bias, source)


# ---- command line -------------------------------------------------------------------------------------


def image_files(paths: Sequence[str]) -> list[Path]:
    """Files as given; a folder stands for its image files, sorted by name."""
    files = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ZeroShotError(f"folder {given} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        else:
            files.append(given)
    return files


def read_labels(labels: Sequence[str] | None, labels_file: str | None) -> list[str]:
    if labels_file is not None:
        file = Path(labels_file)
        if not file.is_file():
            raise ZeroShotError(f"labels file {file} does not exist")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ZeroShotError(f"labels file {file} is not UTF-8 text") from None
        labels = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not labels:
            raise ZeroShotError(f"labels file {file} holds no labels (one a line; # starts a comment)")
    labels = [label.strip() for label in labels or ()]
    if any(not label for label in labels):
        raise ZeroShotError("a label is empty")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ZeroShotError(f"label {repeated[0]!r} is given more than once")
    return labels


def check_templates(templates: Sequence[str]) -> list[str]:
    for template in templates:
        if template.count("{}") != 1:
            raise ZeroShotError(f"template {template!r} must hold exactly one {{}} where the label goes")
    return list(templates)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="vlm-zeroshot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", default=str(DEFAULT_TOWER),
                        help="whole CLIP/SigLIP folder or hub id, or a model folder (default: models/demo)")
    parser.add_argument("--image", nargs="+", required=True, help="image files and/or folders of images")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", nargs="+", help="the labels to score")
    labels.add_argument("--labels-file", help="a text file of labels, one a line (# starts a comment)")
    parser.add_argument("--template", action="append", help='prompt template, e.g. "a photo of {}"; repeat to '
                        "average several (default: the label as it is)")
    parser.add_argument("--activation", choices=ACTIVATIONS, help="override the checkpoint's own")
    parser.add_argument("--top", type=int, help="print only the best K labels per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a ranking per image")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Ranked labels with probabilities, per image."""
    if args.top is not None and args.top < 1:
        raise ZeroShotError("--top must be at least 1")
    labels = read_labels(args.labels, args.labels_file)
    templates = check_templates(args.template or ["{}"])
    files = image_files(args.image)
    scorer = load_zero_shot(args.tower, args.activation, args.device)
    if scorer.activation == "softmax" and len(labels) < 2:
        raise ZeroShotError("a softmax over one label is always 1: give two labels or more (or --activation sigmoid)")
    label_embeds = scorer.embed_labels(labels, templates)
    # A batch of pictures at a time: a folder of camera photos would not fit in memory at once.
    probabilities = torch.cat([scorer.probabilities(scorer.logits(
        scorer.embed_images([load_image(file) for file in files[start:start + BATCH]]), label_embeds))
        for start in range(0, len(files), BATCH)])
    results = []
    for file, row in zip(files, probabilities, strict=True):
        order = row.argsort(descending=True)[: args.top]
        results.append({"image": str(file), "activation": scorer.activation,
                        "labels": [{"label": labels[i], "probability": round(float(row[i]), 6)} for i in order]})
    return results


def main(argv: list[str] | None = None) -> int:
    """The ``vlm-zeroshot`` command; returns the exit status (2: bad input, said in one line on stderr)."""
    try:
        args = parse_args(argv)
        set_verbosity(args.verbose)
        require_model_folder(args.tower, DEFAULT_TOWER, flag="--tower")
        results = run(args)
    except (UsageError, ZeroShotError, ImageError) as error:
        return fail(error, PROG)
    except (OSError, ValueError) as error:  # a broken model folder (vlm.loading.ModelFolderError is a ValueError)
        return fail(str(error).splitlines()[0] if str(error) else type(error).__name__, PROG)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        note = "softmax: the labels share 1" if result["activation"] == "softmax" else "sigmoid: each label on its own"
        print(f"{result['image']}  ({note})")
        for entry in result["labels"]:
            print(f"  {entry['probability']:.4f}  {entry['label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
