"""The network against SPEC §1: parameter counts, state-dict contract, the reference forward."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from unicom_cli.models.factory import create_model
from unicom_cli.models.registry import available_models, get_spec
from unicom_cli.models.vit import build_model

# SPEC §1 table, written literally. The 512 px GLDv2 models are the B/16 and L/14 networks
# on a bigger patch grid: only pos_embed (patches × width) and feature.0 (patches·width × width)
# grow, so their counts follow from the table rows.
SPEC_PARAMS = {
    "ViT-B/32": 116_723_200,
    "ViT-B/16": 201_967_872,
    "ViT-L/14": 572_328_448,
    "ViT-L/14@336px": 908_200_448,
}
SPEC_PARAMS["ViT-B/16@512px-GLDv2"] = SPEC_PARAMS["ViT-B/16"] + (32 * 32 - 196) * 768 * (1 + 768)
SPEC_PARAMS["ViT-L/14@512px-GLDv2"] = SPEC_PARAMS["ViT-L/14"] + (36 * 36 - 256) * 1024 * (1 + 1024)


def test_registry_lists_the_six_published_models():
    assert available_models("unicom") == list(SPEC_PARAMS)


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_parameter_count_equals_spec_on_meta_device(name):
    with torch.device("meta"):
        model = build_model(get_spec(name))
    assert sum(p.numel() for p in model.parameters()) == SPEC_PARAMS[name]
    assert get_spec(name).num_params == SPEC_PARAMS[name]


def spec_state_dict_shapes(width: int, depth: int, patch: int, patches: int,
                           embedding: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes spelled out from the SPEC §1 architecture text."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
        "pos_embed": (1, patches, width),
        "norm.weight": (width,),
        "norm.bias": (width,),
        "feature.0.weight": (width, patches * width),
        "feature.2.weight": (embedding, width),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width),  # no qkv bias
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
        })
    for index, size in ((1, width), (3, embedding)):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"feature.{index}.{leaf}"] = (size,)
        shapes[f"feature.{index}.num_batches_tracked"] = ()
    return shapes


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_state_dict_keys_and_shapes_match_the_published_layout(name):
    spec = get_spec(name)
    with torch.device("meta"):
        state = build_model(spec).state_dict()
    grid = spec.input_size // spec.patch_size
    expected = spec_state_dict_shapes(spec.width, spec.depth, spec.patch_size, grid * grid,
                                      spec.embedding_size)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def reference_forward(state: dict, images: torch.Tensor, patch: int, heads: int,
                      depth: int) -> torch.Tensor:
    """SPEC §1 forward in plain torch ops, from a state dict (fp32 math)."""
    s = {k: v.float() for k, v in state.items()}
    x = F.conv2d(images, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + s["pos_embed"]
    batch, tokens, width = x.shape
    head_dim = width // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (width,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
        qkv = (h @ s[p + "attn.qkv.weight"].T).reshape(batch, tokens, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + out @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        h = F.layer_norm(x, (width,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
        h = torch.clamp(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"], 0, 6)
        x = x + h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (width,), s["norm.weight"], s["norm.bias"], eps=1e-5)
    f = x.reshape(batch, -1)

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        mean, var = s[f"{name}.running_mean"], s[f"{name}.running_var"]
        return (t - mean) / torch.sqrt(var + 2e-5) * s[f"{name}.weight"] + s[f"{name}.bias"]

    f = bn(f @ s["feature.0.weight"].T, "feature.1")
    return bn(f @ s["feature.2.weight"].T, "feature.3")


def test_fp16_checkpoint_loads_strict_and_gives_the_reference_embedding(tiny_spec_file,
                                                                         tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert state["pos_embed"].dtype == torch.float16
    loaded = create_model(tiny_spec_file, weights=tiny_checkpoint, precision="fp32")
    model = loaded.model
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.state_dict()["feature.1.running_var"],
                       state["feature.1.running_var"].float())
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(images)
    expected = reference_forward(state, images, patch=8, heads=2, depth=2)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The embedding depends on the weights and the image (not a constant).
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_json_model_without_weights_is_refused_unless_random_init_is_asked(tiny_spec_file):
    from unicom_cli.errors import UsageError

    with pytest.raises(UsageError, match="tiny.json.*--weights.*--random-init"):
        create_model(tiny_spec_file)
    loaded = create_model(tiny_spec_file, pretrained=False, seed=5)
    assert loaded.weights_path is None and loaded.sha256 is None and loaded.random_init_seed == 5
    assert loaded.spec.source == str(tiny_spec_file)


def test_bad_json_model_names_the_file_and_field(tmp_path):
    from unicom_cli.errors import UnknownModel

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"input_size": 6, "patch_size": 8, "width": 32, "depth": 1,
                                "heads": 2, "embedding_size": 4}))
    with pytest.raises(UnknownModel, match="bad.json.*smaller than patch_size"):
        get_spec(path)


def test_input_size_not_a_multiple_of_the_patch_floors_the_grid(tmp_path):
    """The published GLDv2 ViT-L/14 runs at 512 px: 512 // 14 = 36 patches a side."""
    from unicom_cli.models.registry import with_input_size

    spec = with_input_size(get_spec("ViT-L/14"), 512)
    assert (spec.grid, spec.num_patches) == (36, 1296)
    assert spec.num_params == get_spec("ViT-L/14@512px-GLDv2").num_params
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"input_size": 30, "patch_size": 8, "width": 32, "depth": 1,
                                "heads": 2, "embedding_size": 4}))
    assert get_spec(path).grid == 3


@pytest.mark.parametrize("name", available_models("unicom"))
def test_architecture_json_round_trips(name, tmp_path):
    """ModelSpec.to_json is the architecture file finetune writes (arch.json) and --model reads."""
    spec = get_spec(name)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(spec.to_json()))
    back = get_spec(path)
    assert set(spec.to_json()) == {"name", "input_size", "patch_size", "width", "depth", "heads",
                                   "embedding_size"}
    assert (back.name, back.num_params, back.grid) == (spec.name, spec.num_params, spec.grid)


def test_every_norm_has_the_reference_epsilon(tiny_spec_file):
    """SPEC §1: LayerNorm eps is PyTorch's 1e-5 (not timm's 1e-6), the head's BatchNorm 2e-5.

    Pinned by the definition rather than the attribute: each norm is applied in float64 to
    tokens of small variance, where the two epsilons give visibly different outputs.
    """
    model = build_model(get_spec(tiny_spec_file)).double().eval()
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    depth = get_spec(tiny_spec_file).depth
    assert len(layer_norms) == 2 * depth + 1 and len(batch_norms) == 2
    gen = torch.Generator().manual_seed(0)
    for norm in layer_norms:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
            norm.bias.uniform_(-0.1, 0.1, generator=gen)
        x = torch.randn(4, norm.normalized_shape[0], generator=gen, dtype=torch.float64) * 3e-3
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        torch.testing.assert_close(norm(x), expected.detach(), rtol=1e-12, atol=1e-12)
    for bn in batch_norms:
        with torch.no_grad():
            bn.running_mean.normal_(0, 1e-3, generator=gen)
            bn.running_var.uniform_(1e-6, 1e-5, generator=gen)
        x = torch.randn(4, bn.num_features, generator=gen, dtype=torch.float64) * 3e-3
        expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + 2e-5) * bn.weight + bn.bias
        torch.testing.assert_close(bn(x), expected.detach(), rtol=1e-12, atol=1e-12)
