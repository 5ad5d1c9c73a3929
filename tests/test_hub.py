"""Model card and Hub upload against a fake Hub on 127.0.0.1 (tests/hub_server.py), with the real huggingface_hub.

Any connection or name lookup for a non-loopback address fails the test: nothing here may reach huggingface.co.
"""

import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib

import huggingface_hub
import pytest
import torch
from conftest import gen
from hub_server import FakeHub
from huggingface_hub import ModelCard, snapshot_download
from huggingface_hub.utils import _http

from dit_hf import DiTPipeline
from dit_hf.hub import push_checkpoint, push_output_dir, refuse_token_arguments, safe_push, write_model_card

TOKEN = "hf_dummyTokenThatMustNeverBePublished"
REPO = "dummy-user/tiny-dit"
PUSHED = {
    "README.md",
    "model_index.json",
    "pipeline_dit.py",
    "samples.png",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Online mode for huggingface_hub, but every socket to a non-loopback address (or DNS lookup) is refused.

    Yields the list of addresses connected to.
    """
    blocked, seen = [], []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def _loopback(host) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            blocked.append(address)
            raise ConnectionRefusedError(f"test_hub: blocked a connection to {address}")
        seen.append(address)
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback(host.decode() if isinstance(host, bytes) else host):
            blocked.append(host)
            raise socket.gaierror(f"test_hub: blocked a name lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, which reads it once: undo both.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    _http.close_session()  # a fresh client, built with the environment above
    yield seen
    _http.close_session()
    assert blocked == [], f"huggingface_hub tried to leave the loopback interface: {blocked}"


@pytest.fixture
def hub():
    server = FakeHub(token=TOKEN).start()
    yield server
    server.stop()
    assert server.unknown == [], f"requests the fake hub does not know: {server.unknown}"


def tiny_png() -> bytes:
    """A valid 2x2 grey PNG, written by hand so the test needs no image library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"\x00\x80\x80" * 2)
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def make_output_dir(root) -> str:
    """What the trainer leaves in its output dir, including what must never be uploaded."""
    out = os.path.join(root, "run")
    files = {
        "model_index.json": json.dumps({"_class_name": ["pipeline_dit", "DiTPipeline"]}).encode(),
        "transformer/config.json": json.dumps({"hidden_size": 4, "depth": 1, "num_heads": 2}).encode(),
        "transformer/diffusion_pytorch_model.safetensors": safetensors_bytes(),
        "scheduler/scheduler_config.json": b'{"_class_name": "DDPMScheduler"}',
        "pipeline_dit.py": b"# the pipeline code\n",
        "samples.png": tiny_png(),
        "logs/events.txt": b"loss 0.1\n",
        "checkpoints/checkpoint-2/x.bin": b"\x00\x01checkpoint",
        ".tmp-checkpoint-4/y.bin": b"half-written",
    }
    for path, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(out, path)), exist_ok=True)
        with open(os.path.join(out, path), "wb") as f:
            f.write(data)
    return out


def safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<6f", *range(6))


def local_files(folder) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
    return out


TRAIN_ARGS = {
    "model": "DiT-S/2",
    "resolution": 8,
    "learning_rate": 1e-4,
    "max_train_steps": 4,
    "output_dir": "run",
    "hub_token": TOKEN,
    "wandb_api_key": None,
    "report_to_url": f"https://example.invalid/?token={TOKEN}",
    "generator": torch.Generator(),  # not JSON: left out
}


def card_for(out: str, repo_id: str = REPO, **kwargs) -> str:
    return write_model_card(
        out,
        repo_id,
        TRAIN_ARGS,
        "user/tiny-images",
        3,
        ["tabby, tabby cat", "goldfish", "owl"],
        "samples.png",
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------- model card


def test_model_card_metadata_body_and_no_secret(tmp_path):
    out = make_output_dir(tmp_path)
    path = card_for(out, metrics={"FID (2k samples)": 23.456789})
    assert path == os.path.join(out, "README.md")

    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["dit-hf", "diffusers", "dit", "class-conditional", "image-generation"]
    assert card.data.datasets == ["user/tiny-images"]

    text = open(path).read()
    assert TOKEN not in text and "hub_token" not in text and "api_key" not in text and "report_to_url" not in text
    assert f'DiTPipeline.from_pretrained("{REPO}")' in text
    assert f'DiffusionPipeline.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert 'class_labels=["tabby", "goldfish", "owl"]' in text
    assert "![Samples](samples.png)" in text
    assert "| FID (2k samples) | 23.46 |" in text
    assert "| Model | DiT-S/2 |" in text and "| Learning rate | 0.0001 |" in text
    # Architecture from the saved transformer: 2 x 3 parameters in the safetensors file.
    assert "hidden_size = 4, depth = 1, num_heads = 2, parameters = 6." in text
    args_block = text.split("```json\n")[1].split("```")[0]
    assert json.loads(args_block) == {
        "learning_rate": 1e-4,
        "max_train_steps": 4,
        "model": "DiT-S/2",
        "output_dir": "run",
        "resolution": 8,
    }


def test_model_card_without_hub_dataset_grid_or_names(tmp_path):
    out = make_output_dir(tmp_path)
    write_model_card(out, REPO, {"seed": 0}, "scikit-learn digits", 10, None, None)
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.datasets is None  # a description, not a Hub id
    assert "`scikit-learn digits`" in card.text and "Samples" not in card.text
    assert "class_labels=[0, 1, 2, 3]" in card.text


def test_model_card_rejects_a_grid_outside_the_folder(tmp_path):
    out = make_output_dir(tmp_path)
    with pytest.raises(ValueError, match="inside the output folder"):
        write_model_card(out, REPO, {}, "x", 2, None, str(tmp_path / "elsewhere.png"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_model_card(out, REPO, {}, "x", 2, None, "missing.png")


# ----------------------------------------------------------------------------------------------------- upload


def test_push_uploads_the_pipeline_and_nothing_else(tmp_path, hub, loopback_only):
    out = make_output_dir(tmp_path)
    card_for(out)
    before = local_files(out)

    url = push_output_dir(out, REPO, token=TOKEN, endpoint=hub.url)

    remote = hub.files(REPO)
    assert set(remote) == PUSHED
    assert all(remote[path] == before[path] for path in PUSHED)
    assert url == f"{hub.url}/{REPO}/commit/{hub.repos[REPO]['sha']}"
    assert hub.repos[REPO]["private"] is False
    assert local_files(out) == before
    assert "POST /api/validate-yaml" in hub.requests  # the card's metadata was checked before the upload
    # The guard does sit on the client's path: it saw the connections to the fake hub.
    assert {f"http://{host}:{port}" for host, port, *_ in loopback_only} == {hub.url}

    # Pushing again (the repo exists) with the checkpoints: only the checkpoint is new.
    push_output_dir(out, REPO, token=TOKEN, private=True, include_checkpoints=True, endpoint=hub.url)
    remote = hub.files(REPO)
    assert set(remote) == PUSHED | {"checkpoints/checkpoint-2/x.bin"}
    assert remote["checkpoints/checkpoint-2/x.bin"] == before["checkpoints/checkpoint-2/x.bin"]
    assert len(hub.repos[REPO]["commits"]) == 2


def test_push_creates_a_private_repo_in_the_users_namespace(tmp_path, hub):
    out = make_output_dir(tmp_path)
    assert safe_push(out, "tiny-dit", token=TOKEN, private=True, endpoint=hub.url) is True
    assert hub.repos["dummy-user/tiny-dit"]["private"] is True
    assert "README.md" not in hub.files("dummy-user/tiny-dit")  # no card written: none pushed


def test_push_checkpoint_goes_under_checkpoints(tmp_path, hub):
    out = make_output_dir(tmp_path)
    assert push_checkpoint(os.path.join(out, "checkpoints", "checkpoint-2"), REPO, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO) == {"checkpoints/checkpoint-2/x.bin": b"\x00\x01checkpoint"}


@pytest.mark.parametrize("failure", ["commit_500", "wrong_token", "no_server"])
def test_failed_push_keeps_everything_and_says_how_to_retry(tmp_path, hub, caplog, monkeypatch, failure):
    out = make_output_dir(tmp_path)
    card_for(out)
    before = local_files(out)
    endpoint, token = hub.url, TOKEN
    if failure == "commit_500":
        hub.fail_on = "/commit/"
        # The client retries a 500 with backoff (1, 2, 4, 8 s...): skip the waiting, keep the retries.
        monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)
    elif failure == "wrong_token":
        token = "hf_wrong"
    else:
        hub.stop()  # nothing listens on that port any more

    with caplog.at_level(logging.ERROR, logger="dit_hf.hub"):
        assert safe_push(out, REPO, token=token, endpoint=endpoint) is False
        assert push_checkpoint(os.path.join(out, "checkpoints", "checkpoint-2"), REPO, token, endpoint) is False

    push_message, checkpoint_message = [record.getMessage() for record in caplog.records]
    for message in (push_message, checkpoint_message):
        assert REPO in message and endpoint in message
        assert "all local outputs are kept" in message
        assert token not in message
    assert out in push_message and f"hf upload {REPO} {out} '--exclude=logs/*'" in push_message
    assert f"hf upload {REPO} {os.path.join(out, 'checkpoints', 'checkpoint-2')} checkpoints/checkpoint-2" in (
        checkpoint_message
    )
    assert local_files(out) == before
    if failure == "commit_500":
        assert "Internal Error" in push_message
        assert hub.requests.count(f"POST /api/models/{REPO}/commit/main") > 1  # retried, then given up
    if failure != "no_server":
        assert all(not repo["files"] for repo in hub.repos.values())


def test_push_of_a_missing_folder_is_a_clear_error(tmp_path, hub):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_output_dir(tmp_path / "nope", REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


# ----------------------------------------------------------------------------------------------------- round trip


def test_pushed_pipeline_downloads_and_samples_the_same(tmp_path, hub, saved_pipeline):
    out = tmp_path / "run"
    shutil.copytree(saved_pipeline, out)
    write_model_card(out, REPO, {"model": "tiny"}, "user/tiny-images", 10, None, None)
    assert safe_push(out, REPO, token=TOKEN, endpoint=hub.url)

    folder = snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    assert local_files(folder) == local_files(out)
    kwargs = dict(class_labels=[1, 2], num_inference_steps=2, output_type="np")
    expected = DiTPipeline.from_pretrained(out)(generator=gen(0), **kwargs).images
    images = DiTPipeline.from_pretrained(folder)(generator=gen(0), **kwargs).images
    assert images.shape == (2, 8, 8, 3)
    assert (images == expected).all()


def run_trainer(output_dir, *extra):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train_dit

    args = [
        "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8",
        "--max_train_samples", "32", "--num_inference_steps", "2", "--num_samples_per_class", "1",
        "--report_to", "none", "--validation_steps", "0", "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    return train_dit.main(train_dit.parse_args(args))


def test_trainer_pushes_its_pipeline_with_a_model_card(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    out = tmp_path / "run"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    summary = run_trainer(out, "--push_to_hub", "--hub_model_id", REPO)
    assert summary["pushed"] is True
    arrived = hub.files(REPO)
    assert PUSHED <= set(arrived), sorted(arrived)
    assert not any(name.startswith(("checkpoints/", "logs/")) for name in arrived)
    assert (
        arrived["transformer/diffusion_pytorch_model.safetensors"]
        == (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    card = arrived["README.md"].decode()
    assert "DiTPipeline.from_pretrained" in card and "trust_remote_code=True" in card and TOKEN not in card


def test_trainer_push_failure_keeps_outputs(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    out = tmp_path / "run"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    summary = run_trainer(out, "--push_to_hub", "--hub_model_id", REPO)
    assert summary["pushed"] is False
    assert REPO not in hub.repos or hub.files(REPO) == {}  # the wrong token was refused: nothing arrived
    for name in ("model_index.json", "samples.png", "README.md", "checkpoints/checkpoint-2/trainer_state.json"):
        assert (out / name).is_file(), name


# ----------------------------------------------------------------------------------------------------------- secrets


def test_a_token_on_the_command_line_is_refused_without_repeating_it():
    for argv in (["--hub_token", TOKEN], [f"--hub_token={TOKEN}"], ["--hub-token", TOKEN], ["--token", TOKEN]):
        with pytest.raises(ValueError, match=r"not accepted.*HF_TOKEN environment variable.*`hf auth login`") as info:
            refuse_token_arguments(["--push_to_hub", *argv])
        assert TOKEN not in str(info.value)
    refuse_token_arguments(["--hub_model_id", "user/hub_token", "--push_to_hub"])  # a value, not a flag


def test_the_hub_token_never_reaches_disk(tmp_path, hub):
    """A run that logs to wandb (offline) and pushes its checkpoints and pipeline: no file it leaves has the token."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.path.join(root, "src"),
        "HF_TOKEN": TOKEN,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),  # no saved login: the token comes from HF_TOKEN alone
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("WANDB_DIR", None)  # left by an in-process wandb run of another test: wandb would write there
    out = tmp_path / "run"
    command = [
        sys.executable, os.path.join(root, "train_dit.py"),
        "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8",
        "--max_train_samples", "32", "--num_inference_steps", "2", "--num_samples_per_class", "1",
        "--validation_steps", "0", "--max_train_steps", "2", "--checkpointing_steps", "2", "--logging_steps", "1",
        "--report_to", "wandb", "--push_to_hub", "--hub_model_id", REPO, "--push_checkpoints",
        "--output_dir", str(out),
    ]  # fmt: skip

    # The old way, a token on the command line (which wandb records with the run), is refused before any output.
    sys.path.insert(0, root)
    import train_dit

    with pytest.raises(ValueError, match="--hub_token is not accepted") as info:
        train_dit.parse_args([*command[2:], "--hub_token", TOKEN])
    assert TOKEN not in str(info.value) and not out.exists()

    done = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    arrived = hub.files(REPO)  # the token from HF_TOKEN was used
    assert PUSHED <= set(arrived) and "checkpoints/checkpoint-2/trainer_state.json" in arrived
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "wandb wrote no run file"
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) > 20
    assert [str(path) for path in files if TOKEN.encode() in path.read_bytes()] == []
    assert [name for name, data in arrived.items() if TOKEN.encode() in data] == []
    assert TOKEN.encode() not in done.stdout + done.stderr


def test_a_failed_push_masks_the_token_read_from_the_environment(tmp_path, monkeypatch, caplog):
    out = make_output_dir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # An endpoint that repeats the token (as a proxy URL might) and where nothing listens.
    endpoint = f"http://127.0.0.1:9/{TOKEN}"
    with caplog.at_level(logging.ERROR, logger="dit_hf.hub"):
        assert safe_push(out, REPO, endpoint=endpoint) is False
    message = caplog.records[-1].getMessage()
    assert "all local outputs are kept" in message and "http://127.0.0.1:9/***" in message
    assert TOKEN not in message


def test_from_pretrained_of_a_hub_repo_takes_diffusers_arguments(tmp_path, hub, saved_pipeline, monkeypatch):
    # Hub repo ids go through diffusers' own `download`, which must not take the repo's pipeline_dit.py for remote
    # code when dit_hf is installed; its loading arguments (here a per-component dtype) apply as to a folder.
    assert safe_push(saved_pipeline, REPO, token=TOKEN, endpoint=hub.url)
    # diffusers passes no endpoint: point huggingface_hub's defaults at the fake hub (these are read at import).
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    cache = tmp_path / "cache"
    pipe = DiTPipeline.from_pretrained(REPO, token=TOKEN, cache_dir=cache, dtype={"transformer": torch.float64})
    assert type(pipe) is DiTPipeline and type(pipe.transformer).__module__ == "dit_hf.modeling_dit"
    assert pipe.transformer.dtype == torch.float64
    kwargs = dict(class_labels=[1, 2], num_inference_steps=2, output_type="latent")
    expected = DiTPipeline.from_pretrained(saved_pipeline, dtype=torch.float64)(generator=gen(0), **kwargs).images
    torch.testing.assert_close(pipe(generator=gen(0), **kwargs).images, expected, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_init_from_a_hub_id_of_a_diffusers_pipeline(tmp_path, hub, monkeypatch):
    # `--init_from facebook/DiT-XL-2-256` in miniature: a diffusers pipeline repo whose transformer is a
    # DiTTransformer2DModel, found in its `transformer/` subfolder through diffusers' own Hub loading.
    from diffusers import DiTTransformer2DModel

    from dit_hf import DiTModel
    from dit_hf.init_from import init_from_weights

    config = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, in_channels=4)
    torch.manual_seed(0)
    released = DiTTransformer2DModel(**config, out_channels=8, num_embeds_ada_norm=10, norm_eps=1e-6)
    folder = tmp_path / "released"
    released.save_pretrained(folder / "transformer")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    api = huggingface_hub.HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)

    dims = dict(sample_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2)
    model = DiTModel(**dims, num_classes=3, timestep_freq_shift=1)  # diffusers' timestep frequencies
    init_from_weights(model, REPO, {"2": 9}, cache_dir=str(tmp_path / "cache"))
    table = released.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    ours = model.y_embedder.embedding_table.weight
    assert torch.equal(ours[2], table[9]) and torch.equal(ours[0], table[10]) and torch.equal(ours[3], table[10])
    assert torch.equal(model.blocks[1].mlp.fc1.weight, released.transformer_blocks[1].ff.net[0].proj.weight)
