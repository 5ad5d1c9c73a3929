"""REPA: frozen encoder targets, projector, loss, block-token capture and the offline digits encoder."""

import json

import pytest
import torch
from conftest import tiny_dit
from transformers import (
    AutoModel,
    BitImageProcessorPil,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTMAEConfig,
    ViTMAEModel,
)

from dit_hf.repa import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REPAEncoder,
    REPAProjector,
    cache_encoder_features,
    capture_block_tokens,
    feature_map_to_tokens,
    main,
    repa_loss,
    train_digits_encoder,
)

VIT = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
DIT = dict(in_channels=1, depth=4)  # on 8×8 images with patch 2: a 4×4 token grid, as the encoders above give


def save_random(model_cls, config, folder):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dinov2_path(tmp_path_factory):
    return save_random(Dinov2Model, Dinov2Config(mlp_ratio=2, **VIT), tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def dinov2_reg_path(tmp_path_factory):
    config = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=3, **VIT)
    return save_random(Dinov2WithRegistersModel, config, tmp_path_factory.mktemp("dinov2-reg"))


def images(n=2, channels=3, size=16, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """Reference preprocessing for inputs already at the encoder size, in float64."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (((x.double() + 1) / 2 - mean) / std).float()


@pytest.mark.parametrize("registers", [0, 3])
def test_features_drop_class_and_register_tokens(dinov2_path, dinov2_reg_path, registers):
    path = dinov2_reg_path if registers else dinov2_path
    encoder = REPAEncoder(path)
    x = images()
    features = encoder.feature_map(x)
    assert encoder.num_prefix_tokens == 1 + registers
    assert encoder.grid_size == (4, 4) and encoder.hidden_size == 16
    assert features.shape == (2, 16, 4, 4) and not features.requires_grad

    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(pixel_values=imagenet_normalize(x)).last_hidden_state  # (2, 1 + registers + 16, 16)
    expected = hidden[:, 1 + registers :].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    # On the encoder's own grid the targets are the patch tokens, row-major.
    torch.testing.assert_close(encoder(x, grid_size=(4, 4)), hidden[:, 1 + registers :], atol=1e-5, rtol=1e-5)


def test_image_processor_sets_size_mean_and_std(tmp_path):
    path = save_random(Dinov2Model, Dinov2Config(mlp_ratio=2, **VIT), tmp_path)
    size = {"height": 8, "width": 8}
    BitImageProcessorPil(size=size, crop_size=size, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(path)
    encoder = REPAEncoder(path)
    assert encoder.input_size == (8, 8) and encoder.grid_size == (2, 2)

    # A constant grey image stays constant through any resize: its input is (0.75 - 0.5) / 0.25 = 1 everywhere.
    grey = torch.full((1, 1, 5, 5), 0.5)  # 0.75 in [0, 1]; one channel, repeated to three
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(pixel_values=torch.ones(1, 3, 8, 8)).last_hidden_state
    expected = hidden[:, 1:].reshape(1, 2, 2, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(encoder.feature_map(grey), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.feature_map(grey), encoder.feature_map(grey.expand(-1, 3, -1, -1)))


def test_explicit_input_size_must_be_a_multiple_of_the_patch(dinov2_path):
    with pytest.raises(ValueError, match=r"multiple of the encoder's patch size \(4, 4\), e.g. \(12, 12\)"):
        REPAEncoder(dinov2_path, input_size=11)
    assert REPAEncoder(dinov2_path, input_size=(8, 12)).grid_size == (2, 3)


def test_feature_map_resized_to_non_square_grid():
    feature_map = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    # The same grid returns the patch tokens untouched, in row-major order.
    torch.testing.assert_close(
        feature_map_to_tokens(feature_map, (4, 4)), feature_map.permute(0, 2, 3, 1).reshape(2, 16, 5), atol=0, rtol=0
    )
    # A map that varies along rows only: on a (2, 6) grid every row is constant and rows keep their order.
    rows = torch.arange(4.0).view(1, 1, 4, 1).expand(2, 5, 4, 4)
    tokens = feature_map_to_tokens(rows, (2, 6))
    assert tokens.shape == (2, 12, 5)
    grid = tokens.reshape(2, 2, 6, 5)
    torch.testing.assert_close(grid, grid[:, :, :1].expand_as(grid))
    assert (grid[:, 1] > grid[:, 0] + 1).all()
    torch.testing.assert_close(grid.mean(), torch.tensor(1.5))  # a linear ramp keeps its mean
    constant = torch.full((1, 3, 4, 4), 0.7)
    torch.testing.assert_close(feature_map_to_tokens(constant, (3, 5)), torch.full((1, 15, 3), 0.7))


def test_encoder_resizes_to_dit_grid(dinov2_path):
    encoder = REPAEncoder(dinov2_path)
    x = images(channels=1, size=8)
    targets = encoder(x, grid_size=(2, 6))
    assert targets.shape == (2, 12, 16)
    torch.testing.assert_close(targets, feature_map_to_tokens(encoder.feature_map(x), (2, 6)))


def test_siglip_without_class_token_and_vision_tower_of_a_dual_model(tmp_path):
    vision = dict(intermediate_size=32, **VIT)
    path = save_random(SiglipVisionModel, SiglipVisionConfig(**vision), tmp_path / "vision")
    encoder = REPAEncoder(path)
    assert encoder.num_prefix_tokens == 0
    x = images()
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(pixel_values=imagenet_normalize(x)).last_hidden_state  # (2, 16, 16): patches only
    torch.testing.assert_close(encoder(x, grid_size=(4, 4)), hidden, atol=1e-5, rtol=1e-5)

    text = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    dual = save_random(SiglipModel, SiglipConfig(text_config=text, vision_config=vision), tmp_path / "dual")
    encoder = REPAEncoder(dual)
    assert encoder.hidden_size == 16 and not hasattr(encoder.model, "text_model")
    assert encoder(x, grid_size=(4, 4)).shape == (2, 16, 16)


def test_mae_keeps_every_patch_in_order(tmp_path):
    config = ViTMAEConfig(intermediate_size=32, mask_ratio=0.75, **VIT)
    path = save_random(ViTMAEModel, config, tmp_path)
    encoder = REPAEncoder(path)
    x = images()
    features = encoder(x, grid_size=(4, 4))
    assert features.shape == (2, 16, 16)

    # Reference: MAE with mask ratio 0 and a random shuffle, unshuffled with its own `ids_restore`.
    model = ViTMAEModel.from_pretrained(path, mask_ratio=0.0).eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(pixel_values=imagenet_normalize(x), noise=noise)
    index = out.ids_restore.unsqueeze(-1).expand(-1, -1, 16)
    expected = torch.gather(out.last_hidden_state[:, 1:], 1, index)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_encoder_is_frozen(dinov2_path):
    encoder = REPAEncoder(dinov2_path)
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    before = {name: p.clone() for name, p in encoder.named_parameters()}

    model = tiny_dit(**DIT).train()
    projector = REPAProjector(32, encoder.hidden_size, projector_dim=64)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(projector.parameters()), lr=1e-2)
    x = images(n=4, channels=1, size=8)
    with capture_block_tokens(model, 2) as captured:
        model(x, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3]), force_drop_ids=torch.zeros(4, dtype=bool))
    loss = repa_loss(projector(captured.tokens), encoder(x, grid_size=(4, 4)))
    loss.backward()
    optimizer.step()
    for name, p in encoder.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)


def test_repa_loss_matches_cosine_formula():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=generator), torch.randn(3, 5, 7, generator=generator)
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1))
    torch.testing.assert_close(repa_loss(a, b).double(), -cos.mean(), atol=1e-6, rtol=1e-6)
    # Scale-free, -1 when aligned, +1 when opposed.
    torch.testing.assert_close(repa_loss(a, 3 * a), torch.tensor(-1.0))
    torch.testing.assert_close(repa_loss(a, -a), torch.tensor(1.0))
    with pytest.raises(ValueError, match="same \\(B, N, D\\) shape"):
        repa_loss(a, b[..., :6])


def test_projector_shape_and_save_load(tmp_path):
    projector = REPAProjector(32, 16, projector_dim=64)
    layers = [m for m in projector.mlp]
    assert [type(m).__name__ for m in layers] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert (layers[0].in_features, layers[2].in_features, layers[4].out_features) == (32, 64, 16)
    tokens = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    projector.save_pretrained(tmp_path)
    reloaded = REPAProjector.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(tokens), projector(tokens), atol=0, rtol=0)
    assert projector(tokens).shape == (2, 9, 16)


def dit_inputs(n=2):
    x = images(n=n, channels=1, size=8, seed=1)
    return x, torch.arange(1, n + 1) * 100, torch.arange(n) % 10


def test_capture_matches_manual_partial_forward():
    model = tiny_dit(**DIT)
    x, t, y = dit_inputs()
    with capture_block_tokens(model, 3) as captured:
        model(x, t, y)
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed  # (N, T, D)
        c = model.embed_condition(t, y)
        for block in model.blocks[:3]:
            h = block(h, c)
    torch.testing.assert_close(captured.tokens, h, atol=0, rtol=0)
    assert not model.blocks[2]._forward_hooks  # removed on exit


@pytest.mark.slow
def test_capture_with_compiled_blocks():
    model, compiled = tiny_dit(**DIT), tiny_dit(**DIT)
    compiled.compile_repeated_blocks(fullgraph=True)
    x, t, y = dit_inputs()
    with capture_block_tokens(model, 2) as expected:
        model(x, t, y)
    for step in range(3):  # a new hook every step must neither be missed nor force a recompilation
        with torch._dynamo.config.patch(error_on_recompile=step > 0), capture_block_tokens(compiled, 2) as captured:
            compiled(x, t, y)
        torch.testing.assert_close(captured.tokens, expected.tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_blocks_up_to_depth_only(dinov2_path, checkpointing):
    encoder = REPAEncoder(dinov2_path)
    x, t, y = dit_inputs()
    target = encoder(x, grid_size=(4, 4))

    def grads(checkpointing: bool, backward_inside: bool):
        model = tiny_dit(**DIT).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            projector = REPAProjector(32, 16, projector_dim=64)
        with capture_block_tokens(model, 2) as captured:
            model(x, t, y, force_drop_ids=torch.zeros(2, dtype=bool))
            loss = repa_loss(projector(captured.tokens), target)
            if backward_inside:  # the recomputation of block 2 during backward fires the hook again: harmless
                loss.backward()
        if not backward_inside:
            loss.backward()
        named = list(model.named_parameters()) + [("projector." + n, p) for n, p in projector.named_parameters()]
        return {name: p.grad for name, p in named}

    reference = grads(False, False)
    for backward_inside in (False, True):
        got = grads(checkpointing, backward_inside)
        for name, grad in reference.items():
            if name.startswith(("blocks.2.", "blocks.3.", "final_layer.")):
                assert got[name] is None, name
            else:
                assert got[name] is not None and got[name].abs().sum() > 0, name
                torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5)


def test_training_steps_lower_repa_loss(dinov2_path):
    encoder = REPAEncoder(dinov2_path)
    x, t, y = dit_inputs(n=4)
    target = encoder(x, grid_size=(4, 4))
    model = tiny_dit(**DIT).train()
    projector = REPAProjector(32, 16, projector_dim=64)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(projector.parameters()), lr=3e-3)
    losses = []
    for _ in range(8):
        with capture_block_tokens(model, 2) as captured:
            model(x, t, y, force_drop_ids=torch.zeros(4, dtype=bool))
        loss = repa_loss(projector(captured.tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("depth", [0, 5, -1, 2.0, True])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=r"`repa_depth` must be an integer in \[1, 4\]"):
        with capture_block_tokens(tiny_dit(**DIT), depth):
            pass


def test_model_without_blocks():
    with pytest.raises(ValueError, match="no `blocks` ModuleList; pass the unwrapped DiTModel"):
        with capture_block_tokens(torch.nn.Linear(2, 2), 1):
            pass


def test_bad_encoder_name(tmp_path):
    missing = str(tmp_path / "missing-folder")
    with pytest.raises(FileNotFoundError, match=f"folder '{missing}' does not exist: pass an existing local folder"):
        REPAEncoder(missing)
    # Offline (conftest sets HF_HUB_OFFLINE=1), a Hub id that is not in the cache cannot be fetched.
    with pytest.raises(ValueError, match=r"(?s)'nobody/no-such-encoder'.*HF_HUB_OFFLINE=1\) only a local path"):
        REPAEncoder("nobody/no-such-encoder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="(?s)Could not load a vision encoder from .*empty'.*config.json"):
        REPAEncoder(str(tmp_path / "empty"))


def test_unsupported_encoders(tmp_path, dinov2_path):
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    path = save_random(ConvNextModel, config, tmp_path)
    with pytest.raises(ValueError, match=r"Unsupported encoder .* \(convnext\): REPA needs a ViT-style"):
        REPAEncoder(path)
    encoder = REPAEncoder(dinov2_path)
    encoder.num_prefix_tokens = 0  # as if the model returned one token more than a ViT layout explains
    with pytest.raises(ValueError, match=r"Unsupported encoder output: 'dinov2' returned .*\(2, 17, 16\)"):
        encoder.feature_map(images())


def test_bad_images(dinov2_path):
    with pytest.raises(ValueError, match="`images` must be \\(B, C, H, W\\) with C = 1 or 3"):
        REPAEncoder(dinov2_path).feature_map(torch.zeros(2, 2, 16, 16))


def test_cached_features_and_precision(dinov2_path):
    encoder = REPAEncoder(dinov2_path)
    x = images(channels=1, size=8)
    full = encoder.feature_map(x)
    cached = cache_encoder_features(encoder, x)
    assert cached.dtype == torch.float16 and cached.device.type == "cpu" and cached.shape == (2, 16, 4, 4)
    torch.testing.assert_close(cached.float(), full, atol=1e-2, rtol=2**-10)
    torch.testing.assert_close(feature_map_to_tokens(cached.float(), (4, 4)), encoder(x, (4, 4)), atol=1e-2, rtol=1e-3)
    with pytest.raises(ValueError, match="`storage_dtype` must be one of"):
        cache_encoder_features(encoder, x, storage_dtype=torch.int8)

    half = REPAEncoder(dinov2_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.feature_map(x).dtype == torch.bfloat16
    torch.testing.assert_close(half.feature_map(x).float(), full, atol=0.1, rtol=0.05)


def test_train_digits_encoder_saves_a_loadable_encoder(tmp_path):
    summary = train_digits_encoder(
        str(tmp_path), hidden_size=16, num_layers=1, num_heads=2, num_register_tokens=2, max_steps=3, batch_size=16
    )
    assert 0 <= summary["test_accuracy"] <= 1 and summary["num_test"] == 360
    assert f"{summary['test_accuracy']:.1%}" in (tmp_path / "README.md").read_text()
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 16, "width": 16}

    encoder = REPAEncoder(str(tmp_path))
    assert type(encoder.model).__name__ == "Dinov2WithRegistersModel"
    assert encoder.num_prefix_tokens == 3 and encoder.grid_size == (4, 4)
    # The mean and std of the digits in [0, 1]: mostly background, with strokes near 1.
    assert 0.25 < encoder.mean[0] < 0.35 and 0.35 < encoder.std[0] < 0.45
    torch.testing.assert_close(encoder.mean, encoder.mean[:1].expand(3))
    x = images(channels=1, size=8)
    assert encoder(x, grid_size=(4, 4)).shape == (2, 16, 16)


def test_make_digits_encoder_command(tmp_path, capsys):
    summary = main(["make-digits-encoder", "--output", str(tmp_path), "--max_steps", "1"])
    assert summary["max_steps"] == 1
    assert f"held-out accuracy {summary['test_accuracy']:.1%}" in capsys.readouterr().out
    assert AutoModel.from_pretrained(str(tmp_path)).config.hidden_size == 64


def test_classifier_encoder_is_the_frozen_last_stage_before_pooling():
    from dit_hf.evaluation import ImageClassifier, SmallConvNet
    from dit_hf.repa import ClassifierEncoder

    torch.manual_seed(0)
    net = SmallConvNet(3, 10)
    for module in net.modules():  # non-trivial batch-norm statistics, so that eval mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    encoder = ClassifierEncoder(ImageClassifier(net, channels=3, resolution=32))
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    manual = net.eval().features[:20](images)  # three conv blocks; the third block's pooling excluded
    assert encoder.hidden_size == 128
    torch.testing.assert_close(encoder.feature_map(images), manual)
    assert encoder(images, (8, 8)).shape == (2, 64, 128)
    torch.testing.assert_close(encoder(images, (8, 8)), manual.flatten(2).transpose(1, 2))
    assert encoder(images, (4, 4)).shape == (2, 16, 128)  # another DiT grid: the map is resized
    with pytest.raises(ValueError, match="3-channel"):
        encoder.feature_map(torch.zeros(2, 1, 32, 32))


def test_fit_classifier_encoder_holds_out_a_stratified_tenth():
    from dit_hf.repa import fit_classifier_encoder

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(320) % 2
    # Class 0 dark, class 1 bright, with noise: separable, so the held-out accuracy must be perfect.
    pixels = (labels.view(-1, 1, 1, 1) * 150 + 40 + torch.randint(0, 60, (320, 1, 8, 8), generator=g)).to(torch.uint8)
    classifier, accuracy = fit_classifier_encoder(pixels, labels)
    assert accuracy == 1.0 and classifier.channels == 1 and classifier.resolution == 8
    shuffled = labels[torch.randperm(320, generator=g)]  # labels that say nothing about the images
    _, chance = fit_classifier_encoder(pixels, shuffled)
    assert chance < 0.8
    # A class of one image (a user's folder may have one) is fitted whole instead of stopping the run.
    rare = torch.cat([labels[:-1], torch.tensor([2])])
    classifier, accuracy = fit_classifier_encoder(pixels, rare)
    assert classifier.net.head.out_features == 3 and accuracy == 1.0
    _, unchecked = fit_classifier_encoder(pixels[:3], torch.tensor([0, 1, 2]))
    assert unchecked != unchecked  # NaN: nothing to hold out
    with pytest.raises(ValueError, match="has none"):
        fit_classifier_encoder(pixels, None)
    with pytest.raises(ValueError, match="uint8"):
        fit_classifier_encoder(pixels.float(), labels)


def test_cached_images_attach_features_only_without_flips():
    from dit_hf.data import CachedImages

    cached = CachedImages.__new__(CachedImages)
    cached.pixels = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    cached.labels = torch.arange(4)
    cached.features = None

    class Flipping:
        random_flip = True

    cached.transform = Flipping()
    with pytest.raises(ValueError, match="--no-random_flip"):
        cached.attach_features(torch.zeros(4, 2, 2, 2))
    Flipping.random_flip = False
    with pytest.raises(ValueError, match="features for 3 images"):
        cached.attach_features(torch.zeros(3, 2, 2, 2))
