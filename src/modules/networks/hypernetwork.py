"""Hypernetworks for a diffusers ``UNet2DConditionModel``, file-compatible with AUTOMATIC1111's WebUI.

A "hypernetwork" in the Stable-Diffusion community (NovelAI's method, popularised by AUTOMATIC1111's
Stable-Diffusion-WebUI, ``modules/hypernetworks/hypernetwork.py``) is not a network that predicts weights: it
is a pair of small residual MLPs per attention context width. Before every attention layer computes its key
and value, the context (the text encoder states for cross-attention, the hidden state itself for
self-attention) goes through ``x + mlp(x) * multiplier``: module 0 feeds ``to_k``, module 1 feeds ``to_v``.
The query and the UNet's own weights are untouched, so training one only updates the MLPs (a few MB) and its
strength can be dialled at inference by the multiplier.

diffusers has no hypernetworks. This module follows the WebUI's design exactly (layer layout, state-dict keys,
defaults, context-width selection and ``.pt`` format) so that a file trained here loads unchanged in the WebUI
and vice versa, and applies it to a diffusers UNet by wrapping its attention processors.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_SIZES",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
    "HypernetworkModule",
    "apply_hypernetwork",
    "load_hypernetwork",
    "parse_dropout_structure",
    "remove_hypernetwork",
    "save_hypernetwork",
]

# The WebUI's default context widths for SD 1.x (self-attention 320/640/1280, text encoder 768); add 1024 for SD 2.x.
DEFAULT_SIZES = (320, 640, 768, 1280)

# Every torch activation by lower-cased class name, then the WebUI's own names on top. Its "swish" is Hardswish
# (not SiLU): keeping that mapping is what lets a file trained with "swish" mean the same thing in both places.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    name.lower(): cls
    for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
    if cls.__module__ == nn.modules.activation.__name__
}
ACTIVATIONS.update(
    relu=nn.ReLU, leakyrelu=nn.LeakyReLU, elu=nn.ELU, swish=nn.Hardswish, tanh=nn.Tanh, sigmoid=nn.Sigmoid
)

# Keys of the very first WebUI files (two linears named linear1/linear2, no activation).
_OLD_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def parse_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The WebUI's dropout per layer boundary: 0.3 after each hidden layer (the last one only if asked)."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    hidden = [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0]
    return [0.0, *hidden, 0.0]


class HypernetworkModule(nn.Module):
    """One residual MLP ``x + linear(x) * multiplier``; all layers live in ``self.linear`` as in the WebUI."""

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation_func: str | None = None,
        weight_initialization: str = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        ls = list(layer_structure)
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
            raise ValueError(f"layer_structure must start and end with 1, got {ls}")
        if dropout_structure is not None and (
            len(dropout_structure) != len(ls) or dropout_structure[0] != 0 or dropout_structure[-1] != 0
        ):
            raise ValueError(f"dropout_structure must match {ls} in length and start/end with 0")
        if activation_func not in (None, "linear") and activation_func not in ACTIVATIONS:
            raise ValueError(f"unsupported hypernetwork activation: {activation_func}")
        self.multiplier = 1.0  # a plain attribute, not a buffer: the WebUI's state dicts have no such key
        layers: list[nn.Module] = []
        for i in range(len(ls) - 1):
            out_dim = int(dim * ls[i + 1])
            layers.append(nn.Linear(int(dim * ls[i]), out_dim))
            is_last = i == len(ls) - 2
            if activation_func not in (None, "linear") and (activate_output or not is_last):
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(out_dim))
            p = dropout_structure[i + 1] if dropout_structure is not None else 0.0
            if p > 0:
                if not p < 1:
                    raise ValueError(f"dropout probability must be in [0, 1), got {p}")
                layers.append(nn.Dropout(p))
        # Index positions in this Sequential are the state-dict keys, so the order above must stay the WebUI's.
        self.linear = nn.Sequential(*layers)
        self._init_weights(weight_initialization, activation_func)

    def _init_weights(self, scheme: str, activation_func: str | None) -> None:
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        for layer in self.linear:
            if isinstance(layer, nn.LayerNorm):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.Linear):
                if scheme == "Normal":  # small weights: a fresh hypernetwork starts close to the identity
                    nn.init.normal_(layer.weight, 0.0, 0.01)
                elif scheme == "XavierUniform":
                    nn.init.xavier_uniform_(layer.weight)
                elif scheme == "XavierNormal":
                    nn.init.xavier_normal_(layer.weight)
                elif scheme == "KaimingUniform":
                    nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
                elif scheme == "KaimingNormal":
                    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
                else:
                    raise ValueError(f"unknown weight initialization: {scheme}")
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Residual transform; the multiplier only applies at inference, training always uses strength 1."""
        return x + self.linear(x) * (1.0 if self.training else self.multiplier)


class Hypernetwork(nn.Module):
    """A pair of :class:`HypernetworkModule` (for ``to_k``, ``to_v``) per context width, with WebUI metadata."""

    def __init__(
        self,
        enable_sizes: Sequence[int] = DEFAULT_SIZES,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation_func: str | None = None,
        weight_initialization: str = "Normal",
        add_layer_norm: bool = False,
        use_dropout: bool = False,
        dropout_structure: Sequence[float] | None = None,
        activate_output: bool = False,
        last_layer_dropout: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        # Plain python values only: they are pickled into the file the WebUI's restricted unpickler reads.
        self.layer_structure = [float(x) for x in layer_structure]
        self.activation_func = activation_func
        self.weight_initialization = weight_initialization
        self.add_layer_norm = bool(add_layer_norm)
        self.use_dropout = bool(use_dropout)
        self.activate_output = bool(activate_output)
        if dropout_structure is None:
            dropout_structure = parse_dropout_structure(self.layer_structure, use_dropout, last_layer_dropout)
        self.dropout_structure = [float(x) for x in dropout_structure]
        self.name, self.step = name, 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        module_args = (
            self.layer_structure,
            activation_func,
            weight_initialization,
            self.add_layer_norm,
            self.activate_output,
            self.dropout_structure,
        )
        self.layers = nn.ModuleDict(
            {
                str(int(size)): nn.ModuleList([HypernetworkModule(int(size), *module_args) for _ in range(2)])
                for size in enable_sizes
            }
        )
        self.eval()  # as in the WebUI: inference mode (multiplier active, no dropout) until training asks

    @classmethod
    def from_settings(cls, settings: Mapping[Any, Any], name: str | None = None) -> Hypernetwork:
        """Build from a WebUI file's dict, filling keys older files lack with the WebUI's load defaults."""
        dropout_structure = settings.get("dropout_structure")
        use_dropout = bool(dropout_structure and any(dropout_structure)) or settings.get("use_dropout", False)
        return cls(
            enable_sizes=[k for k in settings if type(k) is int],
            layer_structure=settings.get("layer_structure") or (1, 2, 1),
            activation_func=settings.get("activation_func"),
            weight_initialization=settings.get("weight_initialization") or "Normal",
            add_layer_norm=settings.get("is_layer_norm", False),
            use_dropout=use_dropout,
            dropout_structure=dropout_structure,
            # The WebUI reads files without these keys as written before the options existed.
            activate_output=settings.get("activate_output", True),
            last_layer_dropout=settings.get("last_layer_dropout", False),
            name=settings.get("name", name),
        )

    @property
    def sizes(self) -> list[int]:
        """Context widths that have a module pair."""
        return [int(k) for k in self.layers]

    def set_multiplier(self, multiplier: float) -> Hypernetwork:
        """Strength of the residual at inference (0 turns the hypernetwork off)."""
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = float(multiplier)
        return self

    def transform(self, context: Tensor, index: int) -> Tensor:
        """Context for ``to_k`` (index 0) or ``to_v`` (index 1); unchanged when no pair has its width."""
        key = str(context.shape[-1])
        if key not in self.layers:
            return context
        module = self.layers[key][index]
        # The WebUI keeps hypernetworks in float32 under a half-precision UNet: compute there, cast back.
        return module(context.to(module.linear[0].weight.dtype)).to(context.dtype)

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Key and value contexts, as the WebUI's ``apply_single_hypernetwork``."""
        return self.transform(context, 0), self.transform(context, 1)


class _KeyValueView:
    """Stands in for an ``Attention`` inside a wrapped processor: same module, but ``to_k``/``to_v`` see the
    hypernetwork-transformed context. Delegating keeps diffusers' own attention maths (masks, norms, SDPA)."""

    def __init__(self, attn: nn.Module, hypernetwork: Hypernetwork) -> None:
        self._attn, self._hypernetwork = attn, hypernetwork

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def to_k(self, context: Tensor) -> Tensor:
        return self._attn.to_k(self._hypernetwork.transform(context, 0))

    def to_v(self, context: Tensor) -> Tensor:
        return self._attn.to_v(self._hypernetwork.transform(context, 1))


class HypernetworkAttnProcessor:
    """Wraps a diffusers attention processor (e.g. ``AttnProcessor2_0``) to apply a hypernetwork to key/value.

    Deliberately not an ``nn.Module``: ``Attention`` would register it as a submodule, putting the hypernetwork's
    weights into the UNet's state dict and freezing them with the UNet."""

    def __init__(self, inner: Any, hypernetwork: Hypernetwork) -> None:
        self.inner, self.hypernetwork = inner, hypernetwork

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        view = _KeyValueView(attn, self.hypernetwork)
        return self.inner(view, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def apply_hypernetwork(unet: nn.Module, hypernetwork: Hypernetwork, multiplier: float = 1.0) -> None:
    """Route every attention of ``unet`` through ``hypernetwork`` (replacing one applied before)."""
    # Fused QKV projections bypass to_k/to_v, so the hypernetwork would silently do nothing.
    if any(getattr(m, "fused_projections", False) for m in unet.modules()):
        raise ValueError("unfuse the UNet's QKV projections before applying a hypernetwork")
    remove_hypernetwork(unet)
    hypernetwork.set_multiplier(multiplier)
    hypernetwork.to(next(unet.parameters()).device)
    unet.set_attn_processor(
        {n: HypernetworkAttnProcessor(p, hypernetwork) for n, p in unet.attn_processors.items()}
    )


def remove_hypernetwork(unet: nn.Module) -> None:
    """Restore the processors that were in place before :func:`apply_hypernetwork`."""
    processors = unet.attn_processors
    if any(isinstance(p, HypernetworkAttnProcessor) for p in processors.values()):
        unet.set_attn_processor(
            {n: p.inner if isinstance(p, HypernetworkAttnProcessor) else p for n, p in processors.items()}
        )


def _plain_state_dict(module: nn.Module) -> OrderedDict[str, Tensor]:
    # A fresh OrderedDict drops state_dict()'s `_metadata`; contiguous CPU tensors pickle as bare storages.
    return OrderedDict((k, v.detach().cpu().contiguous()) for k, v in module.state_dict().items())


def save_hypernetwork(
    hypernetwork: Hypernetwork,
    path: str | Path,
    name: str,
    step: int,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> None:
    """Write ``path`` in the WebUI's ``.pt`` layout, readable by its restricted unpickler."""
    hypernetwork.name, hypernetwork.step = name, int(step)
    hypernetwork.sd_checkpoint, hypernetwork.sd_checkpoint_name = sd_checkpoint, sd_checkpoint_name
    state: dict[Any, Any] = {
        size: [_plain_state_dict(m) for m in hypernetwork.layers[str(size)]] for size in hypernetwork.sizes
    }
    state.update(
        layer_structure=list(hypernetwork.layer_structure),
        activation_func=hypernetwork.activation_func,
        is_layer_norm=hypernetwork.add_layer_norm,
        weight_initialization=hypernetwork.weight_initialization,
        activate_output=hypernetwork.activate_output,
        use_dropout=hypernetwork.use_dropout,
        dropout_structure=list(hypernetwork.dropout_structure),
        last_layer_dropout=bool(hypernetwork.dropout_structure[-2] != 0),
        name=name,
        step=int(step),
        sd_checkpoint=sd_checkpoint,
        sd_checkpoint_name=sd_checkpoint_name,
        optional_info=hypernetwork.optional_info or None,
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # The legacy (non-zip) format: torch 2.x zip archives add entries (byteorder, .data/serialization_id, ...)
    # that the WebUI's file check rejects (its issue 14261); the legacy stream is five plain pickles it accepts.
    torch.save(state, path, _use_new_zipfile_serialization=False)


def load_hypernetwork(path: str | Path, map_location: str | torch.device = "cpu") -> Hypernetwork:
    """Read a ``.pt`` written here or by the WebUI (any version) without unpickling arbitrary code."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    hypernetwork = Hypernetwork.from_settings(state, name=Path(path).stem)
    hypernetwork.step = int(state.get("step", 0))
    hypernetwork.sd_checkpoint = state.get("sd_checkpoint")
    hypernetwork.sd_checkpoint_name = state.get("sd_checkpoint_name")
    hypernetwork.optional_info = state.get("optional_info")
    for size in hypernetwork.sizes:
        for module, module_state in zip(hypernetwork.layers[str(size)], state[size], strict=True):
            module.load_state_dict(OrderedDict((_OLD_KEYS.get(k, k), v) for k, v in module_state.items()))
    return hypernetwork.to(map_location)
