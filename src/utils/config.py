"""Config helpers: plain containers for checkpoints, and type checks that name the offending key."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The groups whose nodes are instantiated by the entry points.
INSTANTIATED_GROUPS = ("data", "model", "trainer", "callbacks", "logger")


class ConfigTypeError(TypeError):
    """A config value does not fit the type its ``_target_`` declares for it."""


def plain(value: Any) -> Any:
    """OmegaConf containers -> dicts and lists (resolved); anything else unchanged.

    Hyper-parameters stored in checkpoints must be plain, so checkpoints load with ``weights_only=True``.
    """
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_config_types(cfg: DictConfig, groups: tuple[str, ...] = INSTANTIATED_GROUPS) -> None:
    """Check every instantiated node's values against its ``_target_``'s type hints before building anything.

    ``trainer.max_epochs=abc`` then fails with a message naming ``trainer.max_epochs`` and the expected type,
    instead of a TypeError from deep inside the library.
    """
    for group in groups:
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        if "_target_" in node:
            _check_node(node, group)
        else:  # callbacks / logger: a dict of named nodes
            for name, child in node.items():
                if isinstance(child, DictConfig) and "_target_" in child:
                    _check_node(child, f"{group}.{name}")


def _check_node(node: DictConfig, path: str) -> None:
    from hydra.utils import get_object
    from typeguard import TypeCheckError, check_type

    try:
        target = get_object(node._target_)
    except Exception:  # an unimportable target fails with Hydra's own message at instantiation
        return
    hints = _init_type_hints(target)
    for name in node:
        if str(name).startswith("_"):
            continue
        key = f"{path}.{name}"
        try:
            value = node[name]
        except OmegaConfBaseException:  # unresolvable here (e.g. ${hydra:...} outside a run); checked later
            continue
        if isinstance(value, DictConfig) and "_target_" in value:
            _check_node(value, key)
            continue
        if _has_targets(value):  # e.g. a dict of builders: checked one by one, instantiated into other types
            for child_key, child in value.items():
                if isinstance(child, DictConfig) and "_target_" in child:
                    _check_node(child, f"{key}.{child_key}")
            continue
        hint = hints.get(str(name))
        if hint is None:
            continue
        value = _yaml_to_python(plain(value), hint)
        try:
            check_type(value, hint)
        except TypeCheckError as error:
            raise ConfigTypeError(
                f"{key}={value!r} ({type(value).__name__}) does not fit {_describe(hint)} "
                f"expected by {node._target_}: {error}"
            ) from None


def _has_targets(value: Any) -> bool:
    if not isinstance(value, DictConfig):
        return False
    children = OmegaConf.to_container(value, resolve=False).values()
    return any(isinstance(child, dict) and "_target_" in child for child in children)


def _init_type_hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # hints that name types imported only for type checkers: keep those that are objects
        signature = inspect.signature(function)
        return {
            name: parameter.annotation
            for name, parameter in signature.parameters.items()
            if parameter.annotation is not inspect.Parameter.empty
            and not isinstance(parameter.annotation, str)
        }


def _yaml_to_python(value: Any, hint: Any) -> Any:
    # YAML has no tuples: a list stands for a tuple wherever a tuple is expected.
    if isinstance(value, list) and _accepts_tuple(hint) and not _accepts_list(hint):
        return tuple(value)
    return value


def _accepts_tuple(hint: Any) -> bool:
    return any(typing.get_origin(h) is tuple or h is tuple for h in _alternatives(hint))


def _accepts_list(hint: Any) -> bool:
    import collections.abc

    return any(
        (typing.get_origin(h) or h) in (list, collections.abc.Sequence, collections.abc.Iterable, typing.Any)
        for h in _alternatives(hint)
    )


def _alternatives(hint: Any) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UNION_TYPE) else (hint,)


_UNION_TYPE = type(int | None)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
