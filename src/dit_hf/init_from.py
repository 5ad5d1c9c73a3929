# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Start a training run from released weights: `--init_from`, `--class_map` and `--class_map_unmapped`.

The trainer builds its model from its flags as usual; `init_from_weights` then copies the weights of another DiT into
it (the optimizer, the learning-rate schedule and the step count start fresh). Three sources are accepted:

- a dit-hf folder: a saved pipeline (its `transformer/`, the EMA weights), a training checkpoint folder or a
  `DiTModel` folder;
- diffusers' `DiTTransformer2DModel`: a folder or Hub id of the model or of a pipeline (e.g. `facebook/DiT-XL-2-256`),
  converted with `dit_hf.convert.dit_from_diffusers`;
- an original facebookresearch/DiT checkpoint file (`DiT-XL-2-256x256.pt`, or a `train.py` checkpoint), read with
  `torch.load(weights_only=True)`.

Every weight must fit the new model except the class-label table. With another set of classes, a class map says which
row of the old table each new class starts from:

    --class_map "tabby=281,golden retriever=207,goldfish=1"      # inline: NEW_CLASS=OLD_INDEX, comma-separated
    --class_map class_map.json                                   # {"tabby": 281, "golden retriever": 207, ...}

NEW_CLASS is a class name of the training data (a folder name, a `ClassLabel` name, or the label id of integer labels;
a name with a comma needs the JSON file); OLD_INDEX is a row of the old table (an ImageNet class id for the DiT
release). New classes left out of the map start from the old null-class row (`--class_map_unmapped null`, the default:
they begin as the old model's unconditional prediction, which fine-tuning then specialises) or from the new model's
random initialisation (`fresh`). The null-class row that classifier-free guidance uses is always copied from the old
table.
"""

import json
import os
import re

import torch
from diffusers.utils import logging

from .convert import NUM_HEADS_BY_HIDDEN_SIZE, _read_checkpoint, dit_from_diffusers, load_original_dit_checkpoint
from .modeling_dit import DiTModel

logger = logging.get_logger(__name__)

UNMAPPED_CHOICES = ("null", "fresh")
CLASS_TABLE = "y_embedder.embedding_table.weight"
# The output bias of the timestep MLP: the conditioning is c = t_emb + y_emb, so a label row can be folded into it.
TIMESTEP_BIAS = "t_embedder.mlp.2.bias"
# Config entries that change what the weights compute without changing their shapes, and the flags that set them.
SHAPELESS_CONFIG = {
    "num_heads": "--num_heads",
    "head_num_heads": "--head_num_heads",
    "timestep_freq_shift": "--timestep_freq_shift",
    "pos_embed_type": "--pos_embed_type",
}
MAX_LISTED = 20  # DiT-XL has ~400 tensors: a mismatch of every block is summarised after this many lines


def parse_class_map(spec: str) -> dict[str, int]:
    """`--class_map`: a JSON file holding an object {"new class": old_index}, or inline "new=old,new=old".

    Raises `ValueError` (or `FileNotFoundError` for a `.json` path that does not exist) naming the bad entry.
    """
    if spec.endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise FileNotFoundError(
                f"--class_map {spec!r}: no such file. Pass a JSON file or 'NEW_CLASS=OLD_INDEX,...'."
            )
        with open(spec) as f:
            try:
                pairs = json.load(f, object_pairs_hook=list)
            except json.JSONDecodeError as err:
                raise ValueError(f"--class_map {spec!r} is not valid JSON ({err}).") from err
        if not isinstance(pairs, list) or not all(isinstance(pair, tuple) for pair in pairs):
            raise ValueError(f'--class_map {spec!r} must hold one JSON object, {{"new class name": old_index, ...}}.')
    else:
        pairs = []
        for entry in spec.split(","):
            name, sep, index = entry.rpartition("=")
            if not sep or not name.strip():
                raise ValueError(
                    f"--class_map entry {entry!r} is not NEW_CLASS=OLD_INDEX; write e.g. 'tabby=281,goldfish=1' "
                    "or give a JSON file."
                )
            pairs.append((name.strip(), index.strip()))
    class_map = {}
    for name, index in pairs:
        if name in class_map:
            raise ValueError(f"--class_map names class {name!r} twice; map each new class once.")
        if isinstance(index, bool) or not (isinstance(index, int) or re.fullmatch(r"\d+", str(index))):
            raise ValueError(
                f"--class_map maps {name!r} to {index!r}, which is not a row index of the old label table (an "
                "integer >= 0)."
            )
        class_map[name] = int(index)
    if not class_map:
        raise ValueError(f"--class_map {spec!r} maps no class.")
    return class_map


def resolve_class_map(
    class_map: dict[str, int], class_names: list[str] | None, num_classes: int, old_num_classes: int
) -> dict[int, int]:
    """New label id -> old row, checked against the new classes (by name, else by id) and the old table."""
    if num_classes == 0:
        raise ValueError("--class_map maps classes, but the training data has no labels (an unconditional model).")
    names = {name: i for i, name in enumerate(class_names or [])}
    resolved, unknown, out_of_range = {}, [], []
    for name, old in class_map.items():
        new = names.get(name)
        if new is None and re.fullmatch(r"\d+", name) and int(name) < num_classes:
            new = int(name)
        if new is None:
            unknown.append(name)
        elif old >= old_num_classes:
            out_of_range.append(f"{name}={old}")
        else:
            resolved[new] = old
    if unknown:
        shown = list(names)[:20] if names else f"label ids 0..{num_classes - 1}"
        raise ValueError(
            f"--class_map names {unknown}, which are not classes of the training data; its classes are {shown}"
            f"{' ...' if len(names) > 20 else ''}."
        )
    if out_of_range:
        raise ValueError(
            f"--class_map maps {out_of_range}, but the old label table has classes 0..{old_num_classes - 1} (its "
            f"row {old_num_classes} is the null class, which is kept as the null class)."
        )
    return resolved


def _is_hub_id(source: str) -> bool:
    looks_like_file = source.endswith((".pt", ".pth", ".bin", ".safetensors"))
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not source.startswith(".") and not looks_like_file


def _find_model_config(source: str, cache_dir: str | None) -> tuple[dict, str | None]:
    """(config.json, subfolder) of the model in `source`: at its root, or in `transformer/` for a pipeline."""
    if os.path.isdir(source):
        for subfolder in (None, "transformer"):
            path = os.path.join(source, subfolder or "", "config.json")
            if os.path.isfile(path):
                with open(path) as f:
                    return json.load(f), subfolder
        raise FileNotFoundError(
            f"--init_from {source!r} has no config.json, at its root or in transformer/: pass a saved DiTPipeline, "
            "a DiTModel or DiTTransformer2DModel folder, or an original DiT .pt file."
        )
    if not _is_hub_id(source):
        raise FileNotFoundError(
            f"--init_from {source!r}: no such file or folder (nor a Hub id of the form 'owner/name')."
        )
    errors = []
    for subfolder in (None, "transformer"):
        try:
            return DiTModel.load_config(source, subfolder=subfolder, cache_dir=cache_dir), subfolder
        except OSError as err:
            errors.append(str(err).splitlines()[0])
    raise FileNotFoundError(
        f"--init_from {source!r} is not a local file or folder, and the Hub gave no model config for it ({errors}). "
        "Check the id and the connection (HF_HUB_OFFLINE), or pass a local path."
    )


def load_source_model(source: str, num_heads: int, cache_dir: str | None = None) -> tuple[DiTModel, str]:
    """The `--init_from` weights as a [`DiTModel`], and a description of what was read.

    `num_heads` is used for an original checkpoint whose width is not one of the paper's (checkpoints do not store
    the number of heads).
    """
    if os.path.isfile(source):
        state_dict = _read_checkpoint(source)
        width = state_dict["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in state_dict else None
        overrides = {} if width in NUM_HEADS_BY_HIDDEN_SIZE else {"num_heads": num_heads}
        return load_original_dit_checkpoint(state_dict, **overrides), f"original DiT checkpoint {source}"
    config, subfolder = _find_model_config(source, cache_dir)
    where = source if subfolder is None else f"{source} ({subfolder}/)"
    class_name = config.get("_class_name")
    if class_name == "DiTModel":
        return DiTModel.from_pretrained(source, subfolder=subfolder, cache_dir=cache_dir), f"DiTModel {where}"
    if class_name == "DiTTransformer2DModel":
        from diffusers import DiTTransformer2DModel

        transformer = DiTTransformer2DModel.from_pretrained(source, subfolder=subfolder, cache_dir=cache_dir)
        # Not strict: diffusers' converted release normalises with eps 1e-5 (DiT: 1e-6), which fine-tuning absorbs.
        return dit_from_diffusers(transformer, strict=False), f"diffusers DiTTransformer2DModel {where}"
    raise ValueError(
        f"--init_from {where} holds a {class_name!r}; expected a DiTModel or a diffusers DiTTransformer2DModel."
    )


def _label_rows(config) -> tuple[int, bool]:
    """(number of classes, whether the table has a null row) of a DiTModel config."""
    return config.num_classes, config.num_classes > 0 and config.class_dropout_prob > 0


def mismatches(source: DiTModel, model: DiTModel) -> list[str]:
    """Every difference besides the label table that stops `source`'s weights from starting `model`, one per line."""
    lines = [
        f"config {key}: checkpoint {source.config[key]!r}, model {model.config[key]!r} (set {flag})"
        for key, flag in SHAPELESS_CONFIG.items()
        if source.config[key] != model.config[key]
    ]
    old, new = source.state_dict(), model.state_dict()
    for name in [*new, *(name for name in old if name not in new)]:  # in the model's order: embedders first
        if name == CLASS_TABLE:
            continue
        if name not in new:
            lines.append(f"{name}: checkpoint {tuple(old[name].shape)}, not in the model")
        elif name not in old:
            lines.append(f"{name}: not in the checkpoint, model {tuple(new[name].shape)}")
        elif old[name].shape != new[name].shape:
            lines.append(f"{name}: checkpoint {tuple(old[name].shape)}, model {tuple(new[name].shape)}")
    return lines


def _refuse(source: str, source_model: DiTModel, model: DiTModel, lines: list[str]):
    shown = lines[:MAX_LISTED] + ([f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else [])
    keys = ("hidden_size", "depth", "patch_size", "in_channels", "mlp_ratio", "learn_sigma", "head_depth")
    differing = [
        f"{key} {source_model.config[key]} vs {model.config[key]}"
        for key in keys
        if source_model.config[key] != model.config[key]
    ]
    summary = f" (checkpoint vs model: {', '.join(differing)})" if differing else ""
    listing = "\n  ".join(shown)
    raise ValueError(
        f"--init_from {source}: the weights do not fit the model built from the flags{summary}; only the "
        f"class-label table may differ. Differences:\n  {listing}\nChoose the checkpoint's architecture (--model, "
        "--hidden_size, --depth, --num_heads, --patch_size, --learn_sigma, the block options, and the channels of "
        "--vae / --image_channels)."
    )


@torch.no_grad()
def class_table(
    source: DiTModel,
    model: DiTModel,
    class_map: dict[int, int] | None,
    unmapped: str,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The new label table (and, for an unconditional model, the timestep bias), and how each row started."""
    old_classes, old_null = _label_rows(source.config)
    new_classes, new_null = _label_rows(model.config)
    old = source.state_dict()
    if new_classes == 0:
        if old_classes == 0:
            return {}, {}
        if not old_null:
            raise ValueError(
                "--init_from: the checkpoint is class-conditional without a null-class row, so it has no "
                "unconditional prediction to start an unconditional model from; train on labelled data."
            )
        # c = t_emb + y_null: folding the null row into the timestep MLP's bias keeps the unconditional prediction.
        return {TIMESTEP_BIAS: old[TIMESTEP_BIAS] + old[CLASS_TABLE][old_classes]}, {"null folded into bias": 1}

    table = model.y_embedder.embedding_table.weight.detach().clone()  # the fresh initialisation
    if old_classes == 0:
        # The old model saw c = t_emb: zero rows start every class as its (unconditional) prediction.
        if unmapped == "null":
            table.zero_()
        return {CLASS_TABLE: table}, {f"{unmapped} (unconditional checkpoint)": table.shape[0]}
    old_table = old[CLASS_TABLE].to(table.dtype)
    if class_map is None:
        if new_classes != old_classes:
            raise ValueError(
                f"--init_from: the checkpoint has {old_classes} classes, the training data {new_classes}. Pass "
                "--class_map NEW_CLASS=OLD_INDEX,... to say which old row each new class starts from (the rest "
                "start from the null-class row, or fresh with --class_map_unmapped fresh)."
            )
        class_map = {i: i for i in range(new_classes)}
    counts = {"mapped": len(class_map), unmapped: new_classes - len(class_map)}
    for new, old_index in class_map.items():
        table[new] = old_table[old_index]
    if len(class_map) < new_classes and unmapped == "null":
        if not old_null:
            raise ValueError(
                "--class_map_unmapped null: the checkpoint's label table has no null-class row to start the "
                "unmapped classes from; map every class or pass --class_map_unmapped fresh."
            )
        for new in set(range(new_classes)) - set(class_map):
            table[new] = old_table[old_classes]
    if new_null:
        if old_null:
            table[new_classes] = old_table[old_classes]
        else:
            counts["fresh null row"] = 1  # nothing to keep: the new null row starts from its initialisation
    return {CLASS_TABLE: table}, {key: value for key, value in counts.items() if value}


def init_from_weights(
    model: DiTModel,
    source: str,
    class_map: dict[str, int] | None = None,
    class_names: list[str] | None = None,
    unmapped: str = "null",
    cache_dir: str | None = None,
) -> dict[str, int]:
    """
    Copy the weights of `source` (see the module docstring) into the freshly built `model`, in place.

    Args:
        model ([`DiTModel`]): The model built from the trainer's flags; only its label table may differ in shape.
        source (`str`): A dit-hf or diffusers folder, a Hub id, or an original DiT checkpoint file.
        class_map (`dict[str, int]`, *optional*): New class name (or label id) -> row of the old label table, as
            parsed by `parse_class_map`. Needed when the numbers of classes differ; without it rows are copied as they
            are.
        class_names (`list[str]`, *optional*): The new classes' names, indexed by label id.
        unmapped (`str`, defaults to `"null"`): Where unmapped classes start: the old null-class row, or `"fresh"`
            (the new model's random initialisation).
        cache_dir (`str`, *optional*): Hub cache.

    Returns:
        How many label rows started which way, e.g. `{"mapped": 3, "null": 2}`.

    Raises:
        `ValueError`: listing every parameter whose shape differs (name, checkpoint shape, model shape) and every
            config entry that changes the computation (heads, timestep frequencies, position embedding); and for
            class maps that name unknown classes or rows outside the old table.
    """
    if unmapped not in UNMAPPED_CHOICES:
        raise ValueError(f"--class_map_unmapped must be one of {UNMAPPED_CHOICES}, got {unmapped!r}.")
    source_model, described = load_source_model(source, model.config.num_heads, cache_dir)
    lines = mismatches(source_model, model)
    if lines:
        _refuse(source, source_model, model, lines)
    old_classes, _ = _label_rows(source_model.config)
    if class_map is not None and old_classes == 0:
        raise ValueError(f"--class_map: the --init_from checkpoint {source} is unconditional, it has no label table.")
    resolved = None
    if class_map is not None:
        resolved = resolve_class_map(class_map, class_names, model.config.num_classes, old_classes)
    replaced, counts = class_table(source_model, model, resolved, unmapped)
    state_dict = {name: tensor for name, tensor in source_model.state_dict().items() if name != CLASS_TABLE}
    state_dict.update(replaced)
    model.load_state_dict(state_dict, strict=True)
    if source_model.config.sample_size != model.config.sample_size:
        logger.info(
            "--init_from: sample size %s -> %s; the fixed sin-cos position embedding is recomputed for the new grid.",
            source_model.config.sample_size,
            model.config.sample_size,
        )
    logger.info("Initialised the model from %s; label rows: %s.", described, counts or "none")
    return counts


def check_init_config(config) -> None:
    """Refuse, before any work, a class map without --init_from or with a syntax error (part of the validation of
    `dit_hf.config.TrainConfig`)."""
    if config.class_map is not None:
        if not config.init_from:
            raise ValueError("--class_map maps the classes of an --init_from checkpoint: also pass --init_from.")
        parse_class_map(config.class_map)


def init_model_from_config(model: DiTModel, config, class_names: list[str] | None) -> dict[str, int] | None:
    """Apply `--init_from` of a `dit_hf.config.TrainConfig` to the freshly built `model`, unless
    `--resume_from_checkpoint` finds a checkpoint: a resumed run continues its own weights (so one command serves the
    first launch and every restart)."""
    if not config.init_from:
        return None
    if config.resume_from_checkpoint:
        from .training import list_checkpoints

        # Only whether there is a checkpoint to resume: the resume itself verifies it (hashes, readable state) once.
        found = list_checkpoints(os.path.join(config.output_dir, "checkpoints"))
        if config.resume_from_checkpoint != "latest" or found:
            path = config.resume_from_checkpoint if config.resume_from_checkpoint != "latest" else found[-1][1]
            logger.warning("Resuming from %s: --init_from %s is not applied.", path, config.init_from)
            return None
    class_map = parse_class_map(config.class_map) if config.class_map is not None else None
    return init_from_weights(
        model, config.init_from, class_map, class_names, unmapped=config.class_map_unmapped, cache_dir=config.cache_dir
    )
