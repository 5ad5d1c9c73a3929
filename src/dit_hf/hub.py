# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Publishing a training run on the Hugging Face Hub: the model card, the upload of the output folder, and checkpoints.

The trainer calls these once training has finished (main process only)::

    write_model_card(args.output_dir, repo_id, vars(args), dataset_name, num_classes, class_names, "samples.png")
    safe_push(args.output_dir, repo_id, private=args.hub_private_repo)

The token comes from `HF_TOKEN` or the saved `hf auth login`, never from the command line, which is recorded (shell
history, the process list, wandb's run metadata): [`refuse_token_arguments`] turns a token flag into an error.

`safe_push` and `push_checkpoint` never raise and never touch local files: hours of training must not be lost to a
network error at the very end. They log what failed and the command that retries the upload, and return False.
"""

import json
import logging
import math
import os
import re
import shlex
from collections.abc import Sequence

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .modeling_dit import BLOCK_OPTION_KEYS

logger = logging.getLogger(__name__)

HUB_TAGS = ["dit-hf", "diffusers", "dit", "class-conditional", "image-generation"]

# Never uploaded: training logs (TensorBoard / wandb run folders), temporary files, hidden folders such as the
# `.tmp-checkpoint-N` that a checkpoint is written to before being renamed, and Python caches.
# Patterns are fnmatch-style on paths relative to the output folder, where `*` also matches `/`.
IGNORE_PATTERNS = ["logs/*", "wandb/*", "*.tmp", "*.tmp/*", ".*", "*/.*", "*__pycache__/*"]
# Uploaded only with `include_checkpoints=True` (accelerate states are large: optimizer, RNG, EMA).
CHECKPOINT_PATTERNS = ["checkpoints/*", "checkpoint-*/*"]

# Training arguments whose name matches this are never written to the card.
SECRET_ARG = re.compile(r"token|secret|password|api_key|credential", re.IGNORECASE)

# Command-line flags that would carry a Hub token (refused: argv is recorded).
TOKEN_FLAGS = ("--hub_token", "--hub-token", "--hf_token", "--hf-token", "--token")

# Rows of the card's "Training" table: argument name -> label. Arguments the trainer does not have are skipped.
SUMMARY_ARGS = {
    "model": "Model",
    "resolution": "Resolution",
    "vae": "VAE",
    "max_train_steps": "Training steps",
    "train_batch_size": "Batch size per device",
    "gradient_accumulation_steps": "Gradient accumulation steps",
    "learning_rate": "Learning rate",
    "lr_scheduler": "Learning-rate schedule",
    "mixed_precision": "Mixed precision",
    "use_ema": "EMA",
    "ema_decay": "EMA decay",
    "seed": "Seed",
}
# Keys of transformer/config.json shown under "Architecture".
ARCHITECTURE_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "learn_sigma",
    *BLOCK_OPTION_KEYS,
)
MAX_LISTED_CLASSES = 30


def refuse_token_arguments(argv: Sequence[str]) -> None:
    """Raise ValueError if `argv` passes a Hub token; the message names the flag and never repeats its value.

    A command line is recorded in many places (shell history, `ps`, job logs, wandb's run metadata, which `wandb
    sync` uploads), so the token is read from the environment (`HF_TOKEN`) or the saved login only.
    """
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in TOKEN_FLAGS:
            raise ValueError(
                f"{flag} is not accepted: a token on the command line gets recorded (shell history, process list, "
                f"logs, wandb's run metadata). Drop {flag} and set the HF_TOKEN environment variable, or run "
                "`hf auth login` once."
            )


def _public_args(args: dict) -> dict:
    """The training arguments safe to publish: no secrets, JSON values only (paths become strings)."""
    secrets = [str(value) for key, value in args.items() if SECRET_ARG.search(key) and value]
    public = {}
    for key, value in sorted(args.items()):
        if SECRET_ARG.search(key):
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            continue
        # A secret may also hide inside another value (e.g. a URL with the token in it).
        if any(secret in text for secret in secrets):
            continue
        public[key] = value
    return public


def _hub_dataset_id(dataset_name: str | None) -> str | None:
    """`dataset_name` if it can be a Hub dataset id (not a local folder, not a free-form description), else None."""
    if not dataset_name or os.path.exists(dataset_name):
        return None
    try:
        validate_repo_id(dataset_name)
    except HFValidationError:
        return None
    return dataset_name


def _architecture(output_dir: str) -> dict:
    """The saved transformer's config (selected keys) and its parameter count, when output_dir holds one."""
    folder = os.path.join(output_dir, "transformer")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path) as f:
        config = json.load(f)
    summary = {key: config[key] for key in ARCHITECTURE_KEYS if key in config}
    weights = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]
    if weights:
        from safetensors import safe_open  # reads the headers only, no tensor is loaded

        num_params = 0
        for path in weights:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    num_params += math.prod(f.get_slice(name).get_shape())
        summary["parameters"] = f"{num_params / 1e6:.2f}M" if num_params >= 1e5 else str(num_params)
    return summary


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _example_labels(num_classes: int, class_names: list[str] | None) -> list:
    """Up to four labels for the usage snippet: class names (first synonym) when known, else class ids."""
    if class_names:
        return [name.split(",")[0].strip() for name in class_names[:4]]
    return list(range(min(4, num_classes)))


def write_model_card(
    output_dir: str | os.PathLike,
    repo_id: str,
    args: dict,
    dataset_name: str,
    num_classes: int,
    class_names: list[str] | None,
    sample_grid: str | os.PathLike | None,
    metrics: dict | None = None,
    license: str = "apache-2.0",
) -> str:
    """
    Write `output_dir/README.md`: Hub metadata, what was trained on what, samples, metrics, arguments and usage.

    Args:
        output_dir (`str` or `os.PathLike`): The pipeline folder written by the trainer.
        repo_id (`str`): The Hub repository the folder is meant for (used in the usage snippets).
        args (`dict`): The training arguments, e.g. `vars(args)`. Secrets (`hub_token`, anything named like a
            token, password or key) and values that are not JSON-serialisable are left out.
        dataset_name (`str`): A Hub dataset id (also listed in the metadata), a local folder, or a description.
        num_classes (`int`): Number of classes the model is conditioned on.
        class_names (`list[str]`, *optional*): Class names in class-id order.
        sample_grid (`str` or `os.PathLike`, *optional*): An image inside `output_dir` (relative to it, or absolute).
        metrics (`dict`, *optional*): Measured metrics, e.g. `{"FID (2k samples)": 23.4}`.
        license (`str`, defaults to `"apache-2.0"`): The license in the metadata.

    Returns:
        `str`: The path of the README.md written.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"Output folder {output_dir!r} does not exist; write the pipeline there first.")

    grid_link = None
    if sample_grid is not None:
        grid_path = os.path.join(output_dir, os.fspath(sample_grid))  # an absolute `sample_grid` wins the join
        grid_link = os.path.relpath(grid_path, output_dir).replace(os.sep, "/")
        if grid_link.startswith("../"):
            raise ValueError(
                f"Sample grid {os.fspath(sample_grid)!r} is outside {output_dir!r}: the card links it relatively, "
                "so save the grid inside the output folder."
            )
        if not os.path.isfile(grid_path):
            raise FileNotFoundError(f"Sample grid {grid_path!r} does not exist; save it before writing the card.")

    hub_dataset = _hub_dataset_id(dataset_name)
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=list(HUB_TAGS),
        datasets=[hub_dataset] if hub_dataset else None,
    )

    public_args = _public_args(args)
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "A class-conditional Diffusion Transformer ([DiT](https://arxiv.org/abs/2212.09748)) trained with dit-hf on "
        + (f"[{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})" if hub_dataset else f"`{dataset_name}`")
        + f", conditioned on {num_classes} classes.",
        "",
    ]
    if grid_link is not None:
        lines += ["## Samples", "", f"![Samples]({grid_link})", ""]

    lines += ["## Training", "", "| | |", "|---|---|", f"| Dataset | {dataset_name} |", f"| Classes | {num_classes} |"]
    lines += [
        f"| {label} | {_format_value(public_args[key])} |" for key, label in SUMMARY_ARGS.items() if key in public_args
    ]
    lines.append("")
    architecture = _architecture(output_dir)
    if architecture:
        details = ", ".join(f"{key} = {_format_value(value)}" for key, value in architecture.items())
        lines += [f"Architecture (`transformer/config.json`): {details}.", ""]

    if class_names:
        lines += ["### Classes", ""]
        lines += [f"{i}. {name}" for i, name in enumerate(class_names[:MAX_LISTED_CLASSES])]
        if len(class_names) > MAX_LISTED_CLASSES:
            lines.append(f"\n… and {len(class_names) - MAX_LISTED_CLASSES} more (see `model_index.json`).")
        lines.append("")

    if metrics:
        lines += ["## Metrics", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {_format_value(value)} |" for name, value in metrics.items()]
        lines.append("")

    labels = _example_labels(num_classes, class_names)
    lines += [
        "## Usage",
        "",
        "With dit-hf installed:",
        "",
        "```python",
        "import torch",
        "from dit_hf import DiTPipeline",
        "",
        f'pipe = DiTPipeline.from_pretrained("{repo_id}")',
        f"images = pipe(class_labels={json.dumps(labels)}, guidance_scale=4.0, num_inference_steps=50,",
        "              generator=torch.Generator().manual_seed(0)).images",
        'images[0].save("sample.png")',
        "```",
        "",
        "With plain diffusers: the pipeline and model code are in this repository.",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)',
        f"images = pipe(class_labels={json.dumps(labels)}).images",
        "```",
        "",
        "## Training arguments",
        "",
        "```json",
        json.dumps(public_args, indent=2),
        "```",
        "",
    ]

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    include_checkpoints: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """
    Create `repo_id` if needed and upload `output_dir` to its root; raises on any failure.

    Logs, wandb runs, temporary and hidden files are never uploaded (`IGNORE_PATTERNS`); checkpoints only with
    `include_checkpoints=True`. `token=None` uses the saved login (`hf auth login`) or `HF_TOKEN`; `endpoint=None`
    the Hub (or `HF_ENDPOINT`). Returns the URL of the commit.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"Output folder {output_dir!r} does not exist: nothing to push.")
    api = HfApi(endpoint=endpoint, token=token)
    # The Hub may complete a bare name with the user's namespace: upload to the id it answers.
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    ignore = IGNORE_PATTERNS + ([] if include_checkpoints else CHECKPOINT_PATTERNS)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message or "Upload DiT pipeline trained with dit-hf",
        ignore_patterns=ignore,
    )
    logger.info("Pushed %s to %s: %s", output_dir, repo_id, commit.commit_url)
    return commit.commit_url


def _upload_checkpoint(
    checkpoint_dir: str, repo_id: str, token: str | None, private: bool, endpoint: str | None
) -> str:
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=checkpoint_dir,
        path_in_repo=f"checkpoints/{name}",
        commit_message=f"Upload {name}",
        ignore_patterns=IGNORE_PATTERNS,
    )
    logger.info("Pushed %s to %s: %s", checkpoint_dir, repo_id, commit.commit_url)
    return commit.commit_url


def _report_failure(
    error: Exception, what: str, local_dir: str, repo_id: str, endpoint: str | None, token: str | None, retry: str
):
    where = endpoint or constants.ENDPOINT
    if endpoint:
        retry = f"HF_ENDPOINT={shlex.quote(endpoint)} {retry}"
    message = (
        f"Pushing {what} to the Hub repo {repo_id!r} at {where} failed: {type(error).__name__}: {error}\n"
        f"Nothing was deleted: all local outputs are kept in {local_dir!r}. "
        f"To retry, run:\n  {retry}\n(`huggingface-cli upload` with the same arguments on huggingface_hub < 1.0)."
    )
    # The token in use, given or read from HF_TOKEN / the saved login, is masked wherever an error repeats it.
    for secret in (token, get_token()):
        if secret:
            message = message.replace(secret, "***")
    logger.error(message)


def safe_push(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    include_checkpoints: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> bool:
    """
    [`push_output_dir`] that never raises: on any error it logs what failed, that the local outputs are kept, and
    the `hf upload` command that retries; then returns False. True when the push succeeded.
    """
    output_dir = os.fspath(output_dir)
    try:
        push_output_dir(output_dir, repo_id, token, private, include_checkpoints, commit_message, endpoint)
    except Exception as error:  # a failed upload must not crash the end of a training run
        ignore = IGNORE_PATTERNS + ([] if include_checkpoints else CHECKPOINT_PATTERNS)
        retry = shlex.join(["hf", "upload", repo_id, output_dir] + [f"--exclude={pattern}" for pattern in ignore])
        if private:
            retry += " --private"
        _report_failure(error, output_dir, output_dir, repo_id, endpoint, token, retry)
        return False
    return True


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
) -> bool:
    """
    Upload one checkpoint folder to `checkpoints/<folder name>/` of `repo_id`, creating the repo if needed (pass the
    same `private` as for the final push: the visibility of an existing repo is not changed).

    Never raises: on any error it logs what failed and how to retry, and returns False (as [`safe_push`]).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"Checkpoint folder {checkpoint_dir!r} does not exist.")
        _upload_checkpoint(checkpoint_dir, repo_id, token, private, endpoint)
    except Exception as error:  # a failed upload must not stop training
        name = os.path.basename(os.path.normpath(checkpoint_dir))
        retry = shlex.join(["hf", "upload", repo_id, checkpoint_dir, f"checkpoints/{name}"])
        _report_failure(error, f"checkpoint {name}", checkpoint_dir, repo_id, endpoint, token, retry)
        return False
    return True
