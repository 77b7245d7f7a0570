"""What a checkpoint says about the module that wrote it, so one loader can rebuild any of them."""

from __future__ import annotations

from typing import Any

MODULE_CLASS_KEY = (
    "module_class"  # "package.module.ClassName" of the LightningModule that wrote the checkpoint
)


def record_module_class(module: Any, checkpoint: dict[str, Any]) -> None:
    """Called from a module's ``on_save_checkpoint``."""
    checkpoint[MODULE_CLASS_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"
