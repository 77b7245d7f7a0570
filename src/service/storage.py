"""The service's one output root: every file it writes or reads is named by an id it chose itself.

Ids are 32 random hex digits (``secrets.token_hex``). No part of a request — a prompt, a style, an upload's file
name, an id it sends — becomes part of a path: an id from a request is checked with a full-string match (``re.match``
with ``$`` would let a trailing newline through) and the resolved path must still lie inside the root (a symlink
planted inside it cannot lead out).

    root/images/<id>.png      generated images, control images, prepared photos, strips
    root/uploads/<id>.png     uploaded photos, decoded, checked and stored again as PNG
    root/manifests/<id>.json  a job's manifest (its id is the job's)
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["ID_PATTERN", "InvalidId", "Store", "new_id"]

ID_PATTERN = "^[0-9a-f]{32}$"  # for OpenAPI; checks below use _ID.fullmatch
_ID = re.compile(r"[0-9a-f]{32}")
_FOLDERS = {"images": ".png", "uploads": ".png", "manifests": ".json"}


class InvalidId(ValueError):
    """An id that the service cannot have chosen, or one whose path would leave the root."""


def new_id() -> str:
    """A fresh random id: 128 bits as 32 hex digits."""
    return secrets.token_hex(16)


class Store:
    """Files under ``root``, by folder and id."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        for folder in _FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def path(self, folder: str, file_id: str) -> Path:
        """The file of ``file_id`` in ``folder``; InvalidId unless the id is one of ours and stays inside."""
        if not isinstance(file_id, str) or not _ID.fullmatch(file_id):
            raise InvalidId("ids are 32 lowercase hex digits, as the service hands them out")
        path = (self.root / folder / f"{file_id}{_FOLDERS[folder]}").resolve()
        if not path.is_relative_to(self.root / folder):
            raise InvalidId("this id does not name a file of the service")
        return path

    def existing(self, folder: str, file_id: str) -> Path | None:
        """The file of ``file_id`` when it exists, else None (InvalidId for an id we cannot have chosen)."""
        path = self.path(folder, file_id)
        return path if path.is_file() else None

    def save_image(self, image: Image.Image, folder: str = "images") -> str:
        """Write ``image`` as PNG under a new id; returns the id."""
        file_id = new_id()
        path = self.path(folder, file_id)
        temporary = path.with_suffix(".part")
        image.save(temporary, format="PNG")
        temporary.replace(path)  # readers never see half a file
        return file_id

    def open_upload(self, file_id: str) -> Image.Image | None:
        path = self.existing("uploads", file_id)
        if path is None:
            return None
        with Image.open(path) as image:
            return image.convert("RGB")

    def write_manifest(self, job_id: str, manifest: dict[str, Any]) -> None:
        path = self.path("manifests", job_id)
        path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def delete(self, folder: str, file_ids: list[str]) -> None:
        for file_id in file_ids:
            self.path(folder, file_id).unlink(missing_ok=True)
