"""A local COCO split (images, instance annotations, reference captions) as the POPE and CHAIR protocols read it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CocoSplit"]


@dataclass
class CocoSplit:
    """One split of a COCO folder, keyed by image file name.

    `objects`: the category names of each image's instance annotations (images without any are absent);
    `captions`: the reference captions per image (empty when the folder has no captions file).
    """

    image_dir: Path
    categories: list[str]
    objects: dict[str, set[str]]
    captions: dict[str, list[str]]
    file_names: list[str]

    @classmethod
    def from_folder(cls, root: str | Path, split: str = "val2014") -> CocoSplit:
        """Read `root/annotations/instances_<split>.json` (required), `captions_<split>.json` (optional) and the
        images in `root/<split>/` or `root/images/<split>/`."""
        root = Path(root)
        instances_path = root / "annotations" / f"instances_{split}.json"
        if not instances_path.is_file():
            raise ValueError(f"coco: expected {instances_path} in the COCO folder, got no such file")
        image_dir = next((d for d in (root / split, root / "images" / split) if d.is_dir()), None)
        if image_dir is None:
            raise ValueError(f"coco: expected an image folder {root / split} or {root / 'images' / split}, got neither")
        instances = json.loads(instances_path.read_text())
        names_by_id = {image["id"]: image["file_name"] for image in instances["images"]}
        category_names = {category["id"]: category["name"] for category in instances["categories"]}
        objects: dict[str, set[str]] = {}
        for annotation in instances["annotations"]:
            objects.setdefault(names_by_id[annotation["image_id"]], set()).add(category_names[annotation["category_id"]])
        captions: dict[str, list[str]] = {}
        captions_path = root / "annotations" / f"captions_{split}.json"
        if captions_path.is_file():
            for annotation in json.loads(captions_path.read_text())["annotations"]:
                captions.setdefault(names_by_id[annotation["image_id"]], []).append(annotation["caption"])
        return cls(image_dir, list(category_names.values()), objects, captions, sorted(names_by_id.values()))

    def image_path(self, file_name: str) -> Path:
        """The file of one image; ValueError when it is missing from the folder."""
        path = self.image_dir / Path(file_name).name
        if not path.is_file():
            raise ValueError(f"image: expected {path} in the COCO folder, got no such file")
        return path

    def sample(self, count: int, seed: int = 0, *, annotated: bool = True) -> list[str]:
        """`count` image file names drawn at random with `seed` (only annotated images unless `annotated` is
        False), in sorted-then-sampled order so the draw is reproducible."""
        pool = sorted(self.objects) if annotated else self.file_names
        if not 0 < count <= len(pool):
            raise ValueError(f"count: expected 1..{len(pool)} images, got {count}")
        return random.Random(seed).sample(pool, count)
