"""Hypernetworks (NovelAI; AUTOMATIC1111's WebUI): small residual MLPs that transform the context of every
attention layer before its key and value projections, one pair per context width.

The UNet stays frozen; :mod:`src.modules.networks.hypernetwork` holds the networks, their WebUI file format and
the attention processors that apply them to a diffusers UNet. By default a module pair is made for the text
context (the cross-attention width) and for each UNet width (self-attention), as the WebUI's default sizes
(768, 320, 640, 1280 for SD 1.x) do. Users report that training diverges unless the learning rate is small
(5e-6 .. 5e-7); the configs start at 5e-6. Exports ``<name>.pt``, which the WebUI loads unchanged.
"""

from __future__ import annotations

from pathlib import Path

from src.modules.diffusion.finetune import StableDiffusionFineTune
from src.modules.networks.hypernetwork import Hypernetwork, apply_hypernetwork, save_hypernetwork

__all__ = ["HypernetworkFineTune"]


class HypernetworkFineTune(StableDiffusionFineTune):
    method = "hypernetwork"

    def __init__(
        self,
        *args,
        layer_structure: tuple[float, ...] = (1, 2, 1),
        activation_func: str | None = "linear",
        weight_initialization: str = "Normal",
        add_layer_norm: bool = False,
        use_dropout: bool = False,
        dropout_structure: tuple[float, ...] | None = None,
        enable_sizes: tuple[int, ...] | None = None,
        name: str = "hypernetwork",
        **kwargs,
    ) -> None:
        """``enable_sizes``: context widths that get a module pair; default the UNet's own (see module doc)."""
        self.network_settings = dict(
            layer_structure=layer_structure,
            activation_func=activation_func,
            weight_initialization=weight_initialization,
            add_layer_norm=add_layer_norm,
            use_dropout=use_dropout,
            dropout_structure=dropout_structure,
            name=name,
        )
        self.enable_sizes = enable_sizes
        super().__init__(*args, **kwargs)

    def add_trainable_parts(self) -> None:
        config = self.unet.config
        sizes = self.enable_sizes or sorted({config.cross_attention_dim, *config.block_out_channels})
        self.hypernetwork = Hypernetwork(enable_sizes=sizes, **self.network_settings)
        apply_hypernetwork(self.unet, self.hypernetwork)

    def export_weights(self, out_dir: Path) -> None:
        name = self.network_settings["name"]
        save_hypernetwork(
            self.hypernetwork,
            Path(out_dir) / f"{name}.pt",
            name=name,
            step=int(self.global_step),
            sd_checkpoint_name=str(self.hparams.pretrained_model_name_or_path),
        )
