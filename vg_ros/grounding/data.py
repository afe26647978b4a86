"""Referring-expression datasets rendered once from the simulator and cached as npz under `.cache/grounding/`.

A split holds camera images (each stored once, at model input size for training or full size for
evaluation), many expressions per image (box, mask, hops, instance id, text index), and the frozen text
encoder's token features for every distinct text and for its left/right-mirrored twin (used by the
horizontal-flip augmentation: flipping the image swaps "left" and "right" in the command).

    split = load_or_render(seeds=range(0, 40), seconds=2.0, expressions=8, size=(144, 256), encoder=enc)
    split.images (I, h, w, 3) uint8; split.boxes (E, 4) xyxy normalised to [0, 1]; split.masks(i) (h, w) bool
    split.absent_texts(images, rng)    # per image, a command about something that is not in it (or -1)
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vg_ros.sim.seeds import parse_seeds  # noqa: F401 - re-exported for the CLIs

CACHE_DIR = Path(__file__).resolve().parent.parent.parent / ".cache" / "grounding"
FORMAT = 3
EVERY = 5  # keep every 5th tick (0.5 s apart): neighbouring frames are near duplicates

_MIRROR = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost",
           "lefthand": "righthand", "righthand": "lefthand"}


def mirror_text(text: str) -> str:
    """The command that names the same object in the horizontally flipped image (left <-> right)."""
    return re.sub(r"[A-Za-z]+", lambda m: _match_case(m.group(0), _MIRROR.get(m.group(0).lower())), text)


def _match_case(word: str, repl: str | None) -> str:
    if repl is None:
        return word
    return repl.capitalize() if word[:1].isupper() else repl


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float in [0, 1]; the same resampling the pipeline uses at inference."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> (h, w) bool by area coverage >= 0.5 (an object smaller than a pixel keeps its peak)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    cover = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    small = cover >= 0.5
    if mask.any() and not small.any():
        small[np.unravel_index(np.argmax(cover), cover.shape)] = True
    return small


@dataclass
class GroundingSplit:
    """One cached split. Per image: `images` (I, h, w, 3) uint8, `image_seed` (I,), `present` (I, C) bool
    which (kind, colour, size) of `sim.language.descriptors()` shows at least one pixel. Per expression:
    `expr_image` (E,), `text_index` (E,) into `texts`, `mirror_index` (E,), `boxes` (E, 4) xyxy in [0, 1],
    `packed_masks` (E, ceil(h*w/8)) uint8, `hops` (E,), `instance` (E,), `other` (E,) index of an expression
    about a DIFFERENT object in the same image (-1 if none). Texts: `texts` (T,), `text_feats` (T, L, d)
    float16, `text_len` (T,)."""

    images: np.ndarray
    image_seed: np.ndarray
    present: np.ndarray
    expr_image: np.ndarray
    text_index: np.ndarray
    mirror_index: np.ndarray
    boxes: np.ndarray
    packed_masks: np.ndarray
    hops: np.ndarray
    instance: np.ndarray
    other: np.ndarray
    texts: np.ndarray
    text_feats: np.ndarray
    text_len: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __len__(self) -> int:
        return len(self.expr_image)

    def masks(self, index: np.ndarray | int) -> np.ndarray:
        """Boolean masks (h, w) or (n, h, w) of expression(s) `index`."""
        h, w = self.size
        rows = self.packed_masks[index]
        flat = np.unpackbits(np.atleast_2d(rows), axis=1, count=h * w).astype(bool)
        out = flat.reshape(-1, h, w)
        return out[0] if np.ndim(index) == 0 else out

    def text_batch(self, text_index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats (B, L, d) float32, valid (B, L) bool) for text ids, padded to the longest in the batch."""
        lengths = self.text_len[text_index]
        L = int(lengths.max())
        feats = torch.from_numpy(self.text_feats[text_index, :L].astype(np.float32))
        valid = torch.arange(L)[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]
        return feats, valid

    @functools.cached_property
    def text_descriptors(self) -> np.ndarray:
        """(T, C) bool: the descriptors each text's target noun phrase admits."""
        from vg_ros.sim.language import phrase_descriptors
        return np.stack([phrase_descriptors(str(t)) for t in self.texts])

    @functools.cached_property
    def text_mirror(self) -> np.ndarray:
        """(T,) the mirrored twin of each text used by an expression (itself for the others)."""
        out = np.arange(len(self.texts), dtype=np.int32)
        out[self.text_index] = self.mirror_index
        return out

    def absent_texts(self, images: np.ndarray, rng: np.random.Generator, tries: int = 32) -> np.ndarray:
        """For each image id in `images`, the text id of another expression of the split whose target noun
        phrase admits nothing present in that image (so the command's referent is certainly absent), drawn
        at random among `tries` candidates; -1 where none of them qualifies."""
        images = np.asarray(images, dtype=np.int64)
        candidates = self.text_index[rng.integers(0, len(self), (len(images), tries))]
        absent = ~(self.text_descriptors[candidates] & self.present[images][:, None, :]).any(-1)
        first = absent.argmax(1)
        return np.where(absent.any(1), candidates[np.arange(len(images)), first], -1).astype(np.int32)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "GroundingSplit":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _frames(seed: int, seconds: float, expressions: int, rig: str, every: int):
    """(world, SimFrames) of one seed: cameras and expressions only (no LiDAR, no occupancy)."""
    from vg_ros.sim import simulate
    from vg_ros.sim.core import get_renderer
    from vg_ros.types import Rig
    loaded = Rig.load(rig)
    return get_renderer(seed, loaded)[0], simulate(seed, seconds, loaded, every=every, lidar=False, occupancy=False,
                                                   expressions=expressions)


def _camera_expressions(seed: int, seconds: float, expressions: int, rig: str, every: int):
    """(world, frame, camera, that camera's expressions) of one seed, in the order a split stores them."""
    world, frames = _frames(int(seed), seconds, expressions, rig, every)
    for frame in frames:
        by_camera: dict[str, list] = {}
        for expr in frame.expressions:
            by_camera.setdefault(expr.camera, []).append(expr)
        for camera, exprs in by_camera.items():
            yield world, frame, camera, exprs


def text_features(encoder, texts: list[str], device: str | torch.device = "cpu", chunk: int = 64
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The frozen encoder's token features of `texts`, (T, max_tokens, dim) float16 zero-padded, and their
    token counts (T,), encoded `chunk` texts at a time on `device`."""
    feats = np.zeros((len(texts), encoder.max_tokens, encoder.dim), np.float16)
    lengths = np.zeros(len(texts), np.int32)
    for start in range(0, len(texts), chunk):
        f, v = encoder.encode(texts[start:start + chunk], device=device)
        feats[start:start + len(f), :f.shape[1]] = f.cpu().numpy().astype(np.float16)
        lengths[start:start + len(f)] = v.sum(1).cpu().numpy()
    return feats, lengths


def render_split(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                 rig: str = "default", log=print, every: int = EVERY) -> GroundingSplit:
    """Simulate `seeds`, keep every camera image that has expressions; `size` (h, w) resizes images and
    masks (None keeps full size, for evaluation)."""
    from vg_ros.sim.language import present_descriptors
    images, image_seed, present = [], [], []
    expr_image, texts_raw, boxes, masks, hops, instance = [], [], [], [], [], []
    t0 = time.time()
    for seed in seeds:
        for world, frame, camera, exprs in _camera_expressions(seed, seconds, expressions, rig, every):
            image = np.asarray(frame.images[camera])
            H, W = image.shape[:2]
            if size is None:
                stored = image.astype(np.uint8)
            else:
                stored = (resize_image(image, size).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            image_id = len(images)
            images.append(stored)
            image_seed.append(int(seed))
            present.append(present_descriptors(world, frame.instance[camera]))
            for expr in exprs:
                x0, y0, x1, y1 = np.asarray(expr.box, dtype=np.float64)
                expr_image.append(image_id)
                texts_raw.append(str(expr.text))
                boxes.append([x0 / W, y0 / H, x1 / W, y1 / H])
                mask = np.asarray(expr.mask, dtype=bool)
                masks.append(mask if size is None else resize_mask(mask, size))
                hops.append(int(expr.hops))
                instance.append(int(expr.instance_id))
        log(f"[grounding data] seed {seed}: {len(images)} images, {len(expr_image)} expressions "
            f"({time.time() - t0:.0f} s)")
    if not expr_image:
        raise ValueError(f"seeds {list(seeds)}: the simulator produced no expressions")
    unique = sorted(set(texts_raw) | {mirror_text(t) for t in texts_raw})
    lookup = {t: i for i, t in enumerate(unique)}
    feats, lengths = text_features(encoder, unique)
    expr_image_arr = np.asarray(expr_image, np.int32)
    instance_arr = np.asarray(instance, np.int64)
    other = np.full(len(expr_image), -1, np.int32)
    rng = np.random.default_rng(0)
    for image_id in np.unique(expr_image_arr):
        idx = np.flatnonzero(expr_image_arr == image_id)
        for i in idx:
            choices = idx[instance_arr[idx] != instance_arr[i]]
            if len(choices):
                other[i] = rng.choice(choices)
    packed = np.stack([np.packbits(m.reshape(-1)) for m in masks])
    return GroundingSplit(
        images=np.stack(images), image_seed=np.asarray(image_seed, np.int32), present=np.stack(present),
        expr_image=expr_image_arr,
        text_index=np.asarray([lookup[t] for t in texts_raw], np.int32),
        mirror_index=np.asarray([lookup[mirror_text(t)] for t in texts_raw], np.int32),
        boxes=np.asarray(boxes, np.float32), packed_masks=packed, hops=np.asarray(hops, np.int8),
        instance=instance_arr, other=other, texts=np.asarray(unique), text_feats=feats, text_len=lengths)


def relation_negatives(split: GroundingSplit, seeds, seconds: float, expressions: int, encoder,
                       rig: str = "default", every: int = EVERY, cache: Path | None = None
                       ) -> tuple[GroundingSplit, np.ndarray]:
    """Per expression of `split` (rendered by `render_split` with these arguments) a command whose object and
    anchor are both in the image but not in the named relation (`sim.language.relation_negative`: "the red
    car left of the bus" where the only red car is right of it). The simulator is re-run for `seeds` and
    must give the split's expressions in the split's order (ValueError otherwise); `cache` (an .npz path)
    keeps the negatives' texts and features for the next call. Returns (the split with the negatives' texts
    and features appended, (E,) the text id of each expression's negative, -1 where the expression has no
    relation or turning it around still names an object)."""
    if cache is not None and Path(cache).exists():
        with np.load(cache, allow_pickle=False) as data:
            texts, feats, lengths, local = (data[k] for k in ("texts", "feats", "lengths", "index"))
        if len(local) != len(split):
            raise ValueError(f"relation_negatives: {cache} holds {len(local)} expressions, the split {len(split)}")
    else:
        from vg_ros.sim.language import relation_negative, visible_objects
        rng = np.random.default_rng(0)
        seen, negatives = [], []
        for seed in seeds:
            for world, frame, camera, exprs in _camera_expressions(seed, seconds, expressions, rig, every):
                objs = visible_objects(world, frame.instance[camera], frame.depth[camera])
                for expr in exprs:
                    seen.append(str(expr.text))
                    negatives.append(relation_negative(objs, str(expr.text), rng) if expr.hops else None)
        if seen != [str(split.texts[i]) for i in split.text_index]:
            raise ValueError("relation_negatives: the simulator's expressions are not the split's (other seeds, "
                             "seconds or expressions than it was rendered with?)")
        texts = np.asarray(sorted({n for n in negatives if n}), dtype=str)
        lookup = {t: i for i, t in enumerate(texts)}
        local = np.asarray([lookup[n] if n else -1 for n in negatives], np.int32)
        feats, lengths = text_features(encoder, list(texts))
        if cache is not None:
            np.savez(cache, texts=texts, feats=feats, lengths=lengths, index=local)
    if not len(texts):
        return split, local
    merged = replace(split, texts=np.concatenate([split.texts.astype(object), texts]).astype(str),
                     text_feats=np.concatenate([split.text_feats, feats]),
                     text_len=np.concatenate([split.text_len, lengths]))
    return merged, np.where(local >= 0, local + len(split.texts), -1).astype(np.int32)


def cache_path(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, rig: str, encoder) -> Path:
    key = json.dumps({"seeds": [int(s) for s in seeds], "seconds": seconds, "expressions": expressions, "every": EVERY,
                      "size": size, "rig": rig, "text": str(encoder.model_dir), "format": FORMAT})
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    kind = "full" if size is None else f"{size[1]}x{size[0]}"
    return CACHE_DIR / f"split_{kind}_{digest}.npz"


def load_or_render(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                   rig: str = "default", log=print) -> GroundingSplit:
    """The cached split for these arguments, rendering it first when absent."""
    seeds = list(seeds)
    path = cache_path(seeds, seconds, expressions, size, rig, encoder)
    if path.exists():
        log(f"[grounding data] cached {path}")
        return GroundingSplit.load(path)
    split = render_split(seeds, seconds, expressions, size, encoder, rig, log)
    split.save(path)
    log(f"[grounding data] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return split


def load_with_negatives(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                        rig: str = "default", log=print) -> tuple[GroundingSplit, np.ndarray]:
    """`load_or_render` and the split's `relation_negatives` (cached beside it): (split, negatives)."""
    seeds = list(seeds)
    split = load_or_render(seeds, seconds, expressions, size, encoder, rig, log)
    path = cache_path(seeds, seconds, expressions, size, rig, encoder).with_suffix(".relation_negatives.npz")
    return relation_negatives(split, seeds, seconds, expressions, encoder, rig, cache=path)


if __name__ == "__main__":  # pragma: no cover - manual pre-render: python -m vg_ros.grounding.data 0-39 2.0 8
    from vg_ros.grounding.text import TextEncoder
    load_or_render(parse_seeds(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), (144, 256), TextEncoder())
