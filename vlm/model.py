"""The VLM: frozen vision tower -> projector -> any causal LM, images entering by a mask over ``<image>`` slots."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, TextStreamer

from vlm.config import ModelConfig
from vlm.processor import VLMProcessor, load_image_processor, load_tokenizer, pixel_side
from vlm.projector import build_projector, projected_tokens
from vlm.vision import FusedTower, VisionTower, load_vision_encoder

try:  # transformers renamed generate's past_key_values to cache (5.24 warns on the old name)
    from transformers.generation.utils import ALL_CACHE_NAMES

    _CACHE_ARGUMENT = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
except ImportError:
    _CACHE_ARGUMENT = "past_key_values"

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
COMPONENT_DIRS = ("vision_tower", "language_model")  # what save_pretrained(full=True) writes beside config.json


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded as it is (a file missing, truncated or short of tensors); one line."""


class VLM(nn.Module):
    def __init__(self, config: ModelConfig, vision_tower: VisionTower, projector: nn.Module,
                 language_model: PreTrainedModel) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        head = language_model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_dense_rows)

    # ---- images -> visual tokens -> embeddings ------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor,
                       spatial_shapes: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Visual tokens ``[images, tokens_per_image, llm_width]`` (NaFlex: a list, ``[tokens_i, llm_width]`` each)."""
        return self._project(self.vision_tower(pixel_values, spatial_shapes))

    def _project(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            return self.projector(features.to(self.projector_dtype))
        return [self.projector(image[None].to(self.projector_dtype))[0] for image in features]  # ragged: one by one

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     vision_features: torch.Tensor | list[torch.Tensor] | None = None, start: int = 0,
                     spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the ``<image>`` slots from position ``start`` on overwritten by visual tokens.

        ``vision_features`` (the tower's output ``[images, patches, width]``, or a list of ``[patches_i, width]``
        for a NaFlex tower, e.g. from a feature cache) replaces running the tower; ``spatial_shapes`` goes with
        NaFlex pixels. Images fill the slots in order. Slots before ``start`` are already in a KV cache.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        slots[:, :start] = False
        if vision_features is None and pixel_values is not None:
            vision_features = self.vision_tower(pixel_values, spatial_shapes)
        image_embeds = [] if vision_features is None else list(self._project(vision_features))
        counts = [image.shape[0] for image in image_embeds]
        n_slots = int(slots.sum())
        if n_slots != sum(counts):
            per_image = self.config.tokens_per_image
            given = f" ({', '.join(map(str, counts))} each)" if len(set(counts)) > 1 else ""
            raise ValueError(f"input_ids hold {n_slots} image-token slots ({n_slots / per_image:g} image(s) at "
                             f"{per_image} tokens each) but {len(counts)} image(s) gave {sum(counts)} visual "
                             f"tokens{given}")
        if n_slots:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), torch.cat(image_embeds).to(embeds.dtype))
        return embeds

    # ---- forward and generation ------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                vision_features: torch.Tensor | list[torch.Tensor] | None = None,
                spatial_shapes: torch.Tensor | None = None, **kwargs):
        """Returns the LM's output (``loss`` when ``labels`` are given, ``logits``, ``past_key_values``)."""
        embeds = self.embed_inputs(input_ids, pixel_values, vision_features, spatial_shapes=spatial_shapes)
        if labels is not None:  # a visual token is never a target
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                 past_key_values=None, spatial_shapes: torch.Tensor | None = None, **generate_kwargs):
        """Hugging Face ``generate`` over the joined embeddings: the tower runs once, the KV cache does the rest.

        Returns what ``generate`` returns: sequences that start with ``input_ids``. Passing the
        ``past_key_values`` of an earlier turn (``return_dict_in_generate=True``) continues a chat without
        re-encoding what the cache holds, the image included.
        """
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        embeds = self.embed_inputs(input_ids, pixel_values, vision_features, start=cached, spatial_shapes=spatial_shapes)
        if past_key_values is not None:  # only when continuing
            generate_kwargs[_CACHE_ARGUMENT] = past_key_values
        return self.language_model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                                            **generate_kwargs)

    @torch.no_grad()
    def generate_shared(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                        **generate_kwargs) -> torch.Tensor:
        """Batched ``generate`` that runs each distinct image, with the prompt text all rows share, once.

        A VQA evaluation batch is mostly several questions about the same images under one prompt
        template, and on a CPU the image part of the prompt is most of the work. Rows are unpadded with
        ``attention_mask``; the shared prefix is the token prefix common to every row and must hold all
        image slots, and some image must repeat (otherwise this is plain ``generate``). Its KV cache is computed once per distinct
        image and copied to that image's rows; each row's own tokens follow it right-aligned, the gap
        masked out and positions continuing from the prefix, so a row sees what it would see alone.
        Returns only the new tokens, ``[rows, new]`` (with ``return_dict_in_generate``, the output with
        ``sequences`` cut to them).
        """
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask, strict=True)]
        shortest = min(len(r) for r in rows)
        same = torch.stack([r[:shortest] for r in rows]).eq(rows[0][:shortest]).all(0)
        prefix = int(same.long().cumprod(0).sum().clamp(max=shortest - 1))  # every row keeps a token to run
        slots_after = any(bool((r[prefix:] == self.config.image_token_id).any()) for r in rows)
        ragged = generate_kwargs.get("spatial_shapes") is not None  # NaFlex pixels: plain generate
        if prefix == 0 or slots_after or ragged or pixel_values is None or len(pixel_values) != len(rows):
            return _new_tokens(self.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             pixel_values=pixel_values, **generate_kwargs), input_ids.shape[1])
        distinct: list[torch.Tensor] = []
        image_of_row = []
        for pixels in pixel_values:
            match = next((i for i, seen in enumerate(distinct) if torch.equal(seen, pixels)), None)
            if match is None:
                distinct.append(pixels)
                match = len(distinct) - 1
            image_of_row.append(match)
        if len(distinct) == len(rows):  # nothing to share: plain batched generation does the same work
            return _new_tokens(self.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             pixel_values=pixel_values, **generate_kwargs), input_ids.shape[1])
        shared = rows[0][:prefix].expand(len(distinct), -1)
        # Only the cache is needed: no logits over the prefix (8 x 600 positions x a 152k vocabulary is 2.9 GB).
        prefill = self.language_model(inputs_embeds=self.embed_inputs(shared, torch.stack(distinct)), use_cache=True,
                                      logits_to_keep=1)
        cache = prefill[_CACHE_ARGUMENT] if _CACHE_ARGUMENT in prefill else prefill.past_key_values
        cache.batch_select_indices(torch.tensor(image_of_row, device=input_ids.device))
        width = max(len(r) for r in rows) - prefix
        pad = self.language_model.config.pad_token_id or 0
        tails = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros(len(rows), prefix + width, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :prefix] = 1
        for i, r in enumerate(rows):
            tails[i, width - (len(r) - prefix):] = r[prefix:]
            mask[i, prefix + width - (len(r) - prefix):] = 1
        full = torch.cat([shared[:1].expand(len(rows), -1), tails], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return _new_tokens(self.generate(input_ids=full, attention_mask=mask, past_key_values=cache,
                                         position_ids=positions, **generate_kwargs), full.shape[1])

    # ---- what trains ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def parameter_groups(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.vision_tower, "projector": self.projector, "language_model": self.language_model}

    # ---- save ----------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, processor: VLMProcessor, full: bool = True,
                        adapter: bool = False) -> None:
        """One folder that describes itself: ``config.json``, the projector, and (``full``) the tower and LM.

        With ``full=False`` (a stage-1 result) the config keeps pointing at the tower and LM it was
        built from, and only the projector is written. ``adapter=True`` records that the folder needs its
        LoRA adapter in ``<out_dir>/adapter`` (the caller writes it there); loading refuses without one.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = ModelConfig(**vars(self.config))
        config.adapter = adapter
        if full:
            towers = getattr(self.vision_tower, "towers", [self.vision_tower])
            folders = ["vision_tower"] if len(towers) == 1 else [f"vision_tower/{k}" for k in range(len(towers))]
            for tower, image_processor, folder in zip(towers, processor.image_processors, folders, strict=True):
                tower.encoder.save_pretrained(out / folder)
                image_processor.save_pretrained(out / folder)
            self.language_model.save_pretrained(out / "language_model")
            processor.tokenizer.save_pretrained(out / "language_model")
            config.vision_tower = folders[0] if len(folders) == 1 else folders
            config.language_model = "language_model"
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, out / PROJECTOR_FILE)
        config.to_json_file(out / "config.json")


def _new_tokens(output, prompt_length: int):
    if isinstance(output, torch.Tensor):
        return output[:, prompt_length:]
    output.sequences = output.sequences[:, prompt_length:]
    return output


def _dense_rows(module: nn.Module, args: tuple) -> tuple | None:
    """Hand lm_head a densely laid-out input when prefill gives it the last position's slice.

    That slice (``hidden[:, -1:]``) keeps the whole prompt's stride; with a frozen weight, torch's CPU
    bf16 matmul then copies the whole vocabulary matrix on every call (measured: 1.3 s of a 7 s first
    token for Qwen2.5-0.5B, benchmarks/README.md). Copying the one row costs nothing.
    """
    hidden = args[0]
    if hidden.dim() > 1 and hidden.stride(0) != hidden[0].numel():
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])  # .contiguous() keeps the stride
    return None


class CallbackStreamer(TextStreamer):
    """Streams decoded text of the new tokens to a callback as it comes (``generate(streamer=...)``)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


def _resolve(root: Path | None, reference: str) -> str:
    """A component named relative to a saved folder lives inside it; anything else is a path or hub id."""
    if root is not None and (root / reference).exists():
        return str(root / reference)
    return reference


def _make_room_for(language_model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the LM's vocabulary to hold ``<image>``, deterministically.

    transformers samples new rows at random; a stage-1 checkpoint that re-adds the token on every
    load would then see a different ``<image>`` logit each time. The mean row is the same every time.
    """
    old_size = language_model.get_input_embeddings().num_embeddings
    if vocab_size <= old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = {id(m.weight): m.weight for m in (language_model.get_input_embeddings(),
                                                 language_model.get_output_embeddings()) if m is not None}
    with torch.no_grad():
        for weight in matrices.values():
            weight[old_size:] = weight[:old_size].mean(0)


def check_weight_files(folder: str | Path) -> None:
    """Every safetensors file in ``folder`` (and below) opens: a truncated or empty one is named in one line."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(f"{file} is not a complete safetensors file ({error})") from None


def weights_name(folder: str | Path) -> str:
    """The file a message about a checkpoint's tensors should name."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return str(folder)


def load_complete(load: Callable, folder: str | Path, **kwargs):
    """``load(folder, **kwargs)`` (a ``from_pretrained``) that refuses weights the checkpoint lacks or mis-shapes.

    transformers would initialise those at random and log a table of them; this raises one line instead.
    """
    # transformers checks its tensor-parallel plan (and warns about it) whenever its logger has a level set.
    reports = [logging.getLogger(name) for name in ("transformers.modeling_utils",
                                                    "transformers.distributed.tensor_parallel")]
    levels = [report.level for report in reports]
    for report in reports:
        report.setLevel(logging.ERROR)
    try:
        model, info = load(folder, output_loading_info=True, **kwargs)
    finally:
        for report, level in zip(reports, levels, strict=True):
            report.setLevel(level)
    require_all_weights(info, folder)
    return model


def require_all_weights(info: dict, folder: str | Path) -> None:
    """transformers fills tensors a checkpoint lacks (or holds mis-shaped) with random values: refuse instead."""
    missing = sorted(info["missing_keys"])
    mismatched = sorted(f"{key} ({tuple(saved)} in the file, {tuple(wanted)} in the config)"
                        for key, saved, wanted in info["mismatched_keys"])
    problems = [f"{label} {_some(names)}" for label, names in (("lacks", missing), ("mis-shaped", mismatched)) if names]
    if problems:
        raise ModelFolderError(f"{weights_name(folder)}: {'; '.join(problems)}")


def _some(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _component(root: Path | None, reference: str, what: str) -> str:
    """Where a tower or LM lives; a folder the config declares (inside ``root``, or a local path) must exist."""
    resolved = _resolve(root, reference)
    if resolved == reference and not Path(reference).exists():
        if root is not None and reference.split("/")[0] in COMPONENT_DIRS:
            raise ModelFolderError(f"{root / 'config.json'} declares its {what} in {root / reference}, which is "
                                   "missing")
        if Path(reference).is_absolute() or reference.startswith((".", "~")):
            raise ModelFolderError(f"the {what} folder {reference} does not exist")
    if Path(resolved).is_dir() and (root is None or not Path(resolved).is_relative_to(root)):
        check_weight_files(resolved)  # a folder inside root was checked with it
    return resolved


def _load_projector(projector: nn.Module, file: Path) -> None:
    """The saved projector, every tensor present and of the right shape, or one line naming the file."""
    saved = load_file(file)
    wanted = projector.state_dict()
    missing = sorted(set(wanted) - set(saved))
    mismatched = sorted(f"{k} ({tuple(saved[k].shape)} in the file, {tuple(wanted[k].shape)} in the config)"
                        for k in set(wanted) & set(saved) if saved[k].shape != wanted[k].shape)
    unexpected = sorted(set(saved) - set(wanted))
    if missing or mismatched or unexpected:
        problems = [f"{label} {_some(names)}" for label, names in
                    (("lacks", missing), ("mis-shaped", mismatched), ("has unknown", unexpected)) if names]
        raise ModelFolderError(f"{file}: {'; '.join(problems)} (projector {type(projector).__name__})")
    projector.load_state_dict(saved)


class _OriginalLM:
    """An original LLaVA folder named as a language model: its LM is read from LLaVA's shards."""

    def __init__(self, path: str) -> None:
        from vlm.llava_original import language_model_config

        self.path = path
        self.config = language_model_config(json.loads((Path(path) / "config.json").read_text()), Path(path))

    def load(self, dtype: torch.dtype, load_in_4bit: bool) -> PreTrainedModel:
        from vlm.llava_original import original_language_model

        return original_language_model(self.path, dtype, load_in_4bit)


def _original_llava_folder(path: str) -> _OriginalLM | None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    from vlm.llava_original import is_original_llava

    try:
        values = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{config_file} is not valid JSON: {error}") from None
    return _OriginalLM(path) if isinstance(values, dict) and is_original_llava(values) else None


def build_vlm(config: ModelConfig, root: str | Path | None = None, load_in_4bit: bool = False,
              device: str | torch.device | None = None) -> tuple[VLM, VLMProcessor]:
    """Assemble a VLM from its config: load tower and LM, add ``<image>``, and load the projector if saved.

    ``root`` is the folder the config came from: components, ``projector.safetensors`` and (when the config
    declares one) the LoRA ``adapter/`` must be there, every weight file complete, or this raises
    :class:`ModelFolderError`. Without a root, the projector starts from random initialisation.
    """
    root = Path(root) if root is not None else None
    if root is not None:  # refuse an incomplete folder before loading anything big
        check_weight_files(root)
        if not (root / PROJECTOR_FILE).is_file():
            raise ModelFolderError(f"{root / PROJECTOR_FILE} is missing: the model folder has no projector weights")
        if config.adapter and not (root / ADAPTER_DIR / "adapter_config.json").is_file():
            raise ModelFolderError(f"{root / 'config.json'} declares a LoRA adapter but {root / ADAPTER_DIR} holds "
                                   "none (adapter_config.json): the stage-2 result is incomplete")
    dtype = _torch_dtype(config.dtype)
    tower_names = config.vision_tower if isinstance(config.vision_tower, list) else [config.vision_tower]
    tower_paths = [_component(root, name, "vision tower") for name in tower_names]
    llm_path = _component(root, config.language_model, "language model")

    image_processors = [load_image_processor(path) for path in tower_paths]
    towers = [VisionTower(load_complete(load_vision_encoder, path, dtype=dtype), config.vision_feature_layer,
                          config.vision_feature_select, pixel_side(image_processor))
              for path, image_processor in zip(tower_paths, image_processors, strict=True)]
    tower = towers[0] if len(towers) == 1 else FusedTower(towers, config.image_size)
    if tower.naflex and (config.image_size or config.projector == "merge2x2_mlp"):
        raise ValueError("a NaFlex tower keeps each image's shape within its patch budget: leave model.image_size "
                         "unset and use a projector other than merge2x2_mlp (odd patch grids)")
    original = _original_llava_folder(llm_path)  # a stage-2 result trained from an original LLaVA folder
    tokenizer = load_tokenizer(llm_path, config.image_token, **({"config": original.config} if original else {}))
    if config.chat_template:  # e.g. vicuna_v1: Vicuna's tokenizer carries no template of its own
        from vlm.data.templates import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(config.chat_template)
    quantization = None
    if load_in_4bit:
        # Quantize the LM's linear layers only; the tower and projector are separate modules here and
        # lm_head stays in full precision as QLoRA does.
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])
    if original:
        language_model = original.load(dtype, load_in_4bit)
    else:
        language_model = load_complete(AutoModelForCausalLM.from_pretrained, llm_path, dtype=dtype,
                                       quantization_config=quantization, ignore_mismatched_sizes=True)
    image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    # Grow only as far as <image> needs: a tokenizer may list more tokens than the LM has rows, and a
    # saved model must load back with its vocabulary unchanged.
    _make_room_for(language_model, image_token_id + 1)
    if config.image_token_id is not None and config.image_token_id != image_token_id:
        raise ValueError(f"{config.image_token} has id {image_token_id} in tokenizer {llm_path} but the config "
                         f"was saved with id {config.image_token_id}")
    # A placeholder is never a token to generate.
    language_model.generation_config.suppress_tokens = sorted(
        set(language_model.generation_config.suppress_tokens or []) | {image_token_id})
    language_model.requires_grad_(False)

    image_size = config.image_size or tower.native_image_size
    config.image_token_id = image_token_id
    config.tokens_per_image = projected_tokens(config.projector, tower.tokens_per_image(image_size),
                                               config.projector_queries)
    projector = build_projector(config.projector, tower.hidden_size, language_model.config.hidden_size,
                                config.projector_queries).to(dtype)
    if root is not None:
        _load_projector(projector, root / PROJECTOR_FILE)

    if root is not None and (root / ADAPTER_DIR / "adapter_config.json").is_file():
        from peft import PeftModel  # a stage-2 result: base LM + LoRA adapter, not merged yet

        language_model = PeftModel.from_pretrained(language_model, root / ADAPTER_DIR)
    model = VLM(config, tower, projector, language_model)
    if device is not None and not load_in_4bit:
        model.to(device)
    variable = tower.variable_tokens and config.projector != "query_pool_mlp"  # query pooling fixes the count
    processor = VLMProcessor(tokenizer, image_processors if len(towers) > 1 else image_processors[0],
                             config.tokens_per_image, config.image_token, config.image_size, config.image_aspect,
                             config.split_at_images, variable)
    return model, processor


def load_pretrained(name_or_path: str | Path, load_in_4bit: bool = False, device: str | torch.device | None = None,
                    dtype: str | None = None, base: ModelConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """Load a project folder, a Hugging Face Llava folder or an original (haotian-liu) LLaVA folder, or hub ids.

    ``base`` names the LM and tower a LLaVA stage-1 folder (``mm_projector.bin`` only) is put on.
    """
    root = Path(name_or_path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(str(name_or_path)))
        except Exception as error:  # the hub client raises many types; all mean "not here"
            raise FileNotFoundError(f"model {name_or_path} is neither a folder nor a reachable hub repository "
                                    f"({type(error).__name__})") from None
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model folder {root} has no config.json")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    model_type = values.get("model_type")
    from vlm.llava_original import is_original_llava, load_original_llava  # it imports this module

    if is_original_llava(values):
        return load_original_llava(root, values, load_in_4bit=load_in_4bit, device=device, dtype=dtype, base=base)
    if model_type == "llava":
        from vlm.hf_llava import import_llava

        return import_llava(root, device=device, dtype=dtype)
    if model_type != "vlm":
        raise ValueError(f"{config_file} has model_type {model_type!r}; expected 'vlm', 'llava' or "
                         "'llava_llama'")
    config = ModelConfig.from_json_file(config_file)
    if dtype is not None:
        config.dtype = dtype
    return build_vlm(config, root, load_in_4bit=load_in_4bit, device=device)
