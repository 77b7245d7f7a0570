"""AUTOMATIC1111-style hypernetworks on a tiny diffusers UNet: WebUI layer layout, UNet wiring, training, file format."""

import importlib
import pickle
import re
import zipfile
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from src.modules.networks.hypernetwork import (
    Hypernetwork,
    HypernetworkAttnProcessor,
    apply_hypernetwork,
    load_hypernetwork,
    parse_dropout_structure,
    remove_hypernetwork,
    save_hypernetwork,
)

# Tiny UNet: self-attention at widths 32 (down/up blocks) and 64 (mid block), cross-attention context width 32.
SIZES = (32, 64)
WEBUI_KEYS = {
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "name",
    "step",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "optional_info",
}


@pytest.fixture(autouse=True)
def _single_thread():
    # A UNet this small runs ~50× slower with 2 intra-op threads on busy shared cores than with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def run(unet: UNet2DConditionModel, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


def random_hypernetwork(sizes=SIZES, **kwargs) -> Hypernetwork:
    """Weights and biases large enough that the hypernetwork visibly changes the UNet."""
    torch.manual_seed(2)
    hypernetwork = Hypernetwork(sizes, activation_func="relu", weight_initialization="XavierNormal", **kwargs)
    with torch.no_grad():
        for p in hypernetwork.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hypernetwork


# --- (a) the WebUI's layer layout --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "types", "keys"),
    [
        ({"activation_func": "relu"}, ["Linear", "ReLU", "Linear"], [0, 2]),
        (
            {"activation_func": "relu", "add_layer_norm": True, "dropout_structure": [0, 0.3, 0]},
            ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"],
            [0, 2, 4, 5],
        ),
        (
            {"activation_func": "relu", "add_layer_norm": True, "activate_output": True},
            ["Linear", "ReLU", "LayerNorm", "Linear", "ReLU", "LayerNorm"],
            [0, 2, 3, 5],
        ),
        (  # use_dropout with the constructor's last_layer_dropout=True: dropout after both hidden layers
            {"layer_structure": (1, 2, 2, 1), "activation_func": "swish", "use_dropout": True},
            ["Linear", "Hardswish", "Dropout", "Linear", "Hardswish", "Dropout", "Linear"],
            [0, 3, 6],
        ),
        ({"layer_structure": (1, 1.5, 1), "activation_func": "linear"}, ["Linear", "Linear"], [0, 1]),
    ],
)
def test_state_dict_keys_follow_webui_indexing(settings, types, keys):
    module = Hypernetwork([32], **settings).layers["32"][0]
    assert [type(layer).__name__ for layer in module.linear] == types
    assert list(module.state_dict()) == [f"linear.{i}.{p}" for i in keys for p in ("weight", "bias")]
    linears = [layer for layer in module.linear if isinstance(layer, nn.Linear)]
    assert linears[0].in_features == 32 and linears[-1].out_features == 32
    if settings.get("layer_structure") == (1, 1.5, 1):
        assert linears[0].out_features == 48  # int(dim * 1.5)


def test_dropout_structure_and_initialization():
    assert parse_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert parse_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    torch.manual_seed(0)
    hypernetwork = Hypernetwork([64], layer_structure=(1, 4, 1), add_layer_norm=True)
    linear, norm = hypernetwork.layers["64"][1].linear[0], hypernetwork.layers["64"][1].linear[1]
    assert abs(linear.weight.std().item() - 0.01) < 0.001 and not linear.bias.any()
    assert torch.equal(norm.weight, torch.ones(256)) and not norm.bias.any()
    assert not hypernetwork.training  # built in inference mode, as in the WebUI
    # The multiplier scales the residual at inference only; training always sees strength 1.
    module, x = random_hypernetwork().layers["32"][0], torch.randn(4, 32)
    module.multiplier = 0.25
    with torch.no_grad():
        assert torch.allclose(module.eval()(x), x + 0.25 * module.linear(x))
        assert torch.allclose(module.train()(x), x + module.linear(x))
    with pytest.raises(ValueError, match="start and end with 1"):
        Hypernetwork([32], layer_structure=(2, 1))
    with pytest.raises(ValueError, match="activation"):
        Hypernetwork([32], activation_func="nonsense")


# --- (b) wiring into the UNet ------------------------------------------------------------------------------


def test_zero_residual_multiplier_zero_and_removal_leave_unet_unchanged(unet, inputs):
    baseline = run(unet, inputs)
    originals = unet.attn_processors

    zero = Hypernetwork(SIZES, activation_func="relu")
    for pair in zero.layers.values():
        for module in pair:
            nn.init.zeros_(module.linear[-1].weight)
            nn.init.zeros_(module.linear[-1].bias)
    apply_hypernetwork(unet, zero)
    assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(run(unet, inputs), baseline)

    apply_hypernetwork(unet, random_hypernetwork())
    changed = run(unet, inputs)
    assert (changed - baseline).abs().max() > 1e-2

    apply_hypernetwork(unet, random_hypernetwork(), multiplier=0.0)
    assert torch.equal(run(unet, inputs), baseline)

    remove_hypernetwork(unet)
    assert all(unet.attn_processors[name] is p for name, p in originals.items())
    assert torch.equal(run(unet, inputs), baseline)


def test_pair_is_chosen_by_context_width(unet, inputs):
    baseline = run(unet, inputs)
    apply_hypernetwork(unet, random_hypernetwork(sizes=(768,)))  # no attention here has width 768
    assert torch.equal(run(unet, inputs), baseline)
    apply_hypernetwork(unet, random_hypernetwork(sizes=(64,)))  # mid-block self-attention only
    assert (run(unet, inputs) - baseline).abs().max() > 1e-3


def test_module_0_feeds_to_k_and_module_1_feeds_to_v(unet, inputs):
    hypernetwork = random_hypernetwork()
    apply_hypernetwork(unet, hypernetwork, multiplier=0.7)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    seen = {}

    def recorder(name: str):
        return lambda _, args: seen.setdefault(name, args[0])

    names = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")]
    hooks = [block.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    run(unet, inputs)
    for hook in hooks:
        hook.remove()
    k_module, v_module = hypernetwork.layers["32"]
    with torch.no_grad():
        # cross-attention: the text context, transformed; self-attention: the query's input, transformed
        for attn, context in (("attn2", inputs[2]), ("attn1", seen["attn1.to_q"])):
            assert torch.allclose(seen[f"{attn}.to_k"], k_module(context))
            assert torch.allclose(seen[f"{attn}.to_v"], v_module(context))
            assert not torch.allclose(seen[f"{attn}.to_k"], seen[f"{attn}.to_v"])
        assert torch.allclose(k_module(context), context + 0.7 * k_module.linear(context))


# --- (c) training ------------------------------------------------------------------------------------------


def test_training_changes_only_hypernetwork_and_lowers_loss(unet, inputs):
    unet.requires_grad_(False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    hypernetwork = Hypernetwork(SIZES, activation_func="relu")
    apply_hypernetwork(unet, hypernetwork)
    assert unet.state_dict().keys() == before.keys()  # not registered inside the UNet
    assert not [p for p in unet.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in hypernetwork.parameters()]

    hypernetwork.train()
    optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=3e-3)
    noisy, timesteps, context = inputs
    target = torch.randn(noisy.shape, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.98 * losses[0]
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(not torch.equal(p, s) for p, s in zip(hypernetwork.parameters(), start, strict=True))


# --- (d) the WebUI's file format ---------------------------------------------------------------------------

ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch.storage", "_load_from_bytes"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
}
WEBUI_ZIP_NAME = re.compile(r"^[^/]+/(data/\d+|version|data\.pkl)$")


class RestrictedUnpickler(pickle.Unpickler):
    """The WebUI's safety check (``modules/safe.py``): only tensors and plain containers may be unpickled."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)  # contents are not needed to vet the pickle

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")


def webui_check(path) -> None:
    """Raise as the WebUI would: zip archives are vetted by entry names and data.pkl, legacy files by 5 pickles."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = [n for n in archive.namelist() if not WEBUI_ZIP_NAME.match(n)]
            assert not bad, f"entries the WebUI rejects: {bad}"
            (pkl,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            with archive.open(pkl) as file:
                RestrictedUnpickler(file).load()
    else:
        with open(path, "rb") as file:
            unpickler = RestrictedUnpickler(file)
            for _ in range(5):
                unpickler.load()


def test_restricted_unpickler_rejects_modules(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"layer": nn.Linear(2, 2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        webui_check(path)


def test_save_passes_webui_check_and_round_trips(unet, inputs, tmp_path):
    hypernetwork = random_hypernetwork(add_layer_norm=True, use_dropout=True)
    apply_hypernetwork(unet, hypernetwork, multiplier=0.6)
    expected = run(unet, inputs)
    path = tmp_path / "hypernetworks" / "webtoon.pt"
    save_hypernetwork(hypernetwork, path, "webtoon", 123, sd_checkpoint="abcd1234", sd_checkpoint_name="sd15")

    assert not zipfile.is_zipfile(path)  # legacy stream: no byteorder/serialization_id entries to reject
    webui_check(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == WEBUI_KEYS | set(SIZES)
    for size in SIZES:
        assert isinstance(state[size], list) and len(state[size]) == 2
        for module_state, module in zip(state[size], hypernetwork.layers[str(size)], strict=True):
            assert type(module_state) is OrderedDict and module_state.keys() == module.state_dict().keys()
            assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in module_state.values())
    assert state["layer_structure"] == [1.0, 2.0, 1.0] and state["dropout_structure"] == [0.0, 0.3, 0.0]
    assert state["is_layer_norm"] is state["use_dropout"] is state["last_layer_dropout"] is True
    assert state["activate_output"] is False and state["activation_func"] == "relu"
    assert (state["name"], state["step"], state["sd_checkpoint"], state["sd_checkpoint_name"]) == (
        "webtoon",
        123,
        "abcd1234",
        "sd15",
    )

    remove_hypernetwork(unet)
    loaded = load_hypernetwork(path)
    assert (loaded.name, loaded.step, loaded.sd_checkpoint) == ("webtoon", 123, "abcd1234")
    assert [type(m).__name__ for m in loaded.layers["64"][0].linear] == [
        type(m).__name__ for m in hypernetwork.layers["64"][0].linear
    ]
    apply_hypernetwork(unet, loaded, multiplier=0.6)
    assert torch.equal(run(unet, inputs), expected)


# --- (e) files written by the WebUI ------------------------------------------------------------------------


def test_loads_webui_file_without_newer_keys(tmp_path):
    g = torch.Generator().manual_seed(4)
    shapes = {0: (64, 32), 2: (64,), 4: (64, 64), 6: (64,), 7: (32, 64), 9: (32,)}  # 1-2-2-1 at width 32
    modules = [
        OrderedDict(
            (f"linear.{i}.{p}", torch.randn(shape if p == "weight" else shape[:1], generator=g))
            for i, shape in shapes.items()
            for p in ("weight", "bias")
        )
        for _ in range(2)
    ]
    # As saved by a WebUI from before activate_output/dropout_structure existed (default zip format).
    torch.save(
        {
            32: (modules[0], modules[1]),
            "layer_structure": [1, 2, 2, 1],
            "activation_func": "relu",
            "is_layer_norm": True,
            "weight_initialization": "Normal",
            "use_dropout": True,
            "name": "old",
            "step": 7,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        tmp_path / "old.pt",
    )
    hypernetwork = load_hypernetwork(tmp_path / "old.pt")
    assert hypernetwork.activate_output is True  # WebUI default when the key is missing
    assert hypernetwork.dropout_structure == [0, 0.3, 0, 0]  # last_layer_dropout missing -> False
    assert (hypernetwork.name, hypernetwork.step, hypernetwork.sizes) == ("old", 7, [32])
    module = hypernetwork.layers["32"][1]
    expected_types = ["Linear", "ReLU", "LayerNorm", "Dropout"] + ["Linear", "ReLU", "LayerNorm"] * 2
    assert [type(m).__name__ for m in module.linear] == expected_types

    # The WebUI's forward, written out: x + LN(relu(W x + b)) ... * multiplier, with the output activated.
    w = modules[1]
    x = torch.randn(3, 5, 32, generator=g)
    h = x
    for lin, norm in ((0, 2), (4, 6), (7, 9)):
        h = F.relu(F.linear(h, w[f"linear.{lin}.weight"], w[f"linear.{lin}.bias"]))
        h = F.layer_norm(h, h.shape[-1:], w[f"linear.{norm}.weight"], w[f"linear.{norm}.bias"])
    hypernetwork.set_multiplier(0.5)
    with torch.no_grad():
        assert torch.allclose(hypernetwork(x)[1], x + 0.5 * h, atol=1e-6)


def test_loads_first_generation_webui_keys(tmp_path):
    old = OrderedDict(
        [
            ("linear1.weight", torch.ones(64, 32)),
            ("linear1.bias", torch.zeros(64)),
            ("linear2.weight", torch.ones(32, 64)),
            ("linear2.bias", torch.zeros(32)),
        ]
    )
    torch.save({32: [old, old]}, tmp_path / "first.pt")
    hypernetwork = load_hypernetwork(tmp_path / "first.pt")
    assert hypernetwork.name == "first" and hypernetwork.layer_structure == [1, 2, 1]
    assert torch.equal(hypernetwork.layers["32"][0].linear[1].weight, torch.ones(32, 64))
