"""The held-out concept of the offline fine-tuning benchmark: paper 000's hanok, drawn as the shapes demo draws.

Paper 000 teaches Stable Diffusion a subject it draws poorly (the hanok) from 5, 50 or 100 photos whose BLIP
captions name it ``*``. Offline, the base model is the demo's own (``experiment=sd_demo_base``, trained on shapes
without the hanok), and the subject is a teal hanok silhouette (``synthetic.HELD_OUT_KINDS``) in the dataset's
drawing styles, sizes and positions. Captions read as BLIP's would after the paper's replacement: what the
picture is and its background, with the subject's phrase replaced by the placeholder. Backgrounds exclude black,
so that prompts asking for a black background (the benchmark's stand-in for paper 000's fire) ask for something
the subject's images never showed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from src.demo.synthetic import POSITIONS, SIZES, STYLES, Scene, render_scene

CONCEPT_KIND = "hanok"
CONCEPT_COLOUR = "teal"
CONCEPT_BACKGROUNDS = ("white", "gray", "sky blue", "beige")
CONCEPT_NAME = f"{CONCEPT_COLOUR} {CONCEPT_KIND}"  # how the judge CLIP, which has seen hanoks, names it
STYLE_NOUN = {
    "flat": "a painting",
    "outline": "an outline drawing",
    "sketch": "a pencil sketch",
    "dotted": "a dotted drawing",
}
SPEC_FILE = "concept.json"


def concept_caption(style: str, background: str, placeholder: str = "*") -> str:
    """BLIP's caption of a subject image with the subject's phrase replaced: ``a pencil sketch of * on a gray
    background``."""
    return f"{STYLE_NOUN[style]} of {placeholder} on a {background} background"


def write_concept_folder(
    out_dir: str | os.PathLike,
    num_images: int = 100,
    seed: int = 0,
    image_size: int = 64,
    placeholder: str = "*",
) -> Path:
    """``num_images`` PNGs of the subject and a diffusers ``metadata.jsonl`` with their captions; rewritten only
    when the settings differ from the folder's ``concept.json``."""
    out_dir = Path(out_dir)
    spec = {"num_images": num_images, "seed": seed, "image_size": image_size, "placeholder": placeholder}
    spec_path = out_dir / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path.unlink(missing_ok=True)
    lines = []
    for index in range(num_images):
        rng = random.Random(f"webtoon-lab/concept/{seed}/{index}")
        scene = Scene(
            kind=CONCEPT_KIND,
            colour=CONCEPT_COLOUR,
            size=rng.choice(SIZES),
            position=rng.choice(POSITIONS),
            background=rng.choice(CONCEPT_BACKGROUNDS),
        )
        style = rng.choice(STYLES)
        name = f"{CONCEPT_KIND}_{index:04d}.png"
        render_scene(scene, style, image_size, rng).save(out_dir / name)
        lines.append(
            json.dumps({"file_name": name, "text": concept_caption(style, scene.background, placeholder)})
        )
    (out_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    spec_path.write_text(json.dumps(spec) + "\n")  # last: the folder is complete
    return out_dir
