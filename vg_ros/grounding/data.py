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
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vg_ros.sim.seeds import parse_seeds, seed_runs  # noqa: F401 - parse_seeds re-exported for the CLIs

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

    @classmethod
    def load_concat(cls, paths: list[Path]) -> "GroundingSplit":
        """The saved splits at `paths` as one split, in order (image, text and expression ids shifted). Each
        array is allocated once at its full size and filled one file at a time, so the peak memory is the
        result plus one file, not twice the result (two 800-seed training splits are 5.5 GB each)."""
        paths = [Path(p) for p in paths]
        if len(paths) == 1:
            return cls.load(paths[0])
        shapes = [_npz_shapes(p) for p in paths]
        out = {}
        for key in cls.__dataclass_fields__:
            first_shape, dtype = shapes[0][key]
            if key == "texts":   # unicode widths differ per file: the widest
                dtype = np.dtype(f"<U{max(s[key][1].itemsize // 4 for s in shapes)}")
            for s in shapes[1:]:
                if s[key][0][1:] != first_shape[1:] or (key != "texts" and s[key][1] != dtype):
                    raise ValueError(f"load_concat: {key} differs between the splits ({s[key]} vs "
                                     f"{shapes[0][key]}): other sizes or cache formats")
            out[key] = np.empty((sum(s[key][0][0] for s in shapes), *first_shape[1:]), dtype)
        start = {key: 0 for key in out}
        images = texts = exprs = 0
        for path in paths:
            part = cls.load(path)
            shift = {"expr_image": images, "text_index": texts, "mirror_index": texts}
            for key in out:
                value = getattr(part, key)
                if key in shift:
                    value = value + shift[key]
                elif key == "other":
                    value = np.where(value >= 0, value + exprs, -1)
                out[key][start[key]:start[key] + len(value)] = value
                start[key] += len(value)
            images, texts, exprs = images + len(part.images), texts + len(part.texts), exprs + len(part)
            del part
        return cls(**out)


def _npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an uncompressed .npz, read from the headers alone."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as fh:
                read = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(fh) == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
            shapes[name.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype))
    return shapes


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
        f = f * v[..., None]   # the encoder's outputs at [PAD] tokens (masked everywhere) change with the batch
        feats[start:start + len(f), :f.shape[1]] = f.cpu().numpy().astype(np.float16)
        lengths[start:start + len(f)] = v.sum(1).cpu().numpy()
    return feats, lengths


def _render_seed(seed: int, seconds: float, expressions: int, size: tuple[int, int] | None, rig: str, every: int,
                 images: bool = True, relation: bool = False) -> dict:
    """One seed's camera images with expressions and their expressions' records (`render_split`'s lists);
    `images` False keeps only the texts; `relation` adds each expression's relation-turned negative
    (`sim.language.relation_negative`, drawn with a generator seeded by `seed`; None where there is none)."""
    from vg_ros.sim.language import present_descriptors, relation_negative, visible_objects
    out = {k: [] for k in ("images", "present", "expr_image", "texts", "boxes", "masks", "hops", "instance",
                           "negatives")}
    out["seed"] = int(seed)
    rng = np.random.default_rng(seed)
    for world, frame, camera, exprs in _camera_expressions(seed, seconds, expressions, rig, every):
        image = np.asarray(frame.images[camera])
        H, W = image.shape[:2]
        if images:
            out["images"].append(image.astype(np.uint8) if size is None else
                                 (resize_image(image, size).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            out["present"].append(present_descriptors(world, frame.instance[camera]))
        objs = visible_objects(world, frame.instance[camera], frame.depth[camera]) if relation else None
        for expr in exprs:
            out["texts"].append(str(expr.text))
            if relation:
                out["negatives"].append(relation_negative(objs, str(expr.text), rng) if expr.hops else None)
            if not images:
                continue
            x0, y0, x1, y1 = np.asarray(expr.box, dtype=np.float64)
            mask = np.asarray(expr.mask, dtype=bool)
            out["expr_image"].append(len(out["images"]) - 1)
            out["boxes"].append([x0 / W, y0 / H, x1 / W, y1 / H])
            out["masks"].append(np.packbits((mask if size is None else resize_mask(mask, size)).reshape(-1)))
            out["hops"].append(int(expr.hops))
            out["instance"].append(int(expr.instance_id))
    return out


def _one_thread() -> None:
    """A rendering process computes on one core: `workers` of them share the machine."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass


def _render_seeds(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, rig: str, every: int,
                  *, images: bool = True, relation: bool = False, workers: int = 0, log=print) -> list[dict]:
    """`_render_seed` of each seed, in seed order; `workers` > 1 renders that many seeds at a time in
    forked processes."""
    job = functools.partial(_render_seed, seconds=seconds, expressions=expressions, size=size, rig=rig,
                            every=every, images=images, relation=relation)
    t0, count = time.time(), 0
    records = []
    pool = torch.multiprocessing.get_context("fork").Pool(workers, _one_thread) if workers > 1 else None
    try:
        for seed, record in zip(seeds, pool.imap(job, [int(s) for s in seeds]) if pool else map(job, seeds)):
            records.append(record)
            count += len(record["texts"])
            log(f"[grounding data] seed {seed}: {count} expressions ({time.time() - t0:.0f} s)")
    finally:
        if pool is not None:
            pool.terminate()
    return records


def _negative_texts(negatives: list[str | None], encoder, device: str | torch.device = "cpu"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distinct texts, their features, their token counts, (E,) each expression's id among them or -1)."""
    texts = np.asarray(sorted({n for n in negatives if n}), dtype=str)
    lookup = {t: i for i, t in enumerate(texts)}
    return (texts, *text_features(encoder, list(texts), device, chunk=_chunk(device)),
            np.asarray([lookup[n] if n else -1 for n in negatives], np.int32))


def _assemble(records: list[dict], encoder, device: str | torch.device = "cpu") -> tuple[GroundingSplit, tuple | None]:
    """The split of `_render_seeds`' records (token features encoded on `device`) and, when they hold
    relation-turned negatives, `_negative_texts` of those (else None)."""
    def cat(key):
        return [x for r in records for x in r[key]]

    offsets = np.cumsum([0] + [len(r["images"]) for r in records[:-1]])
    expr_image = np.concatenate([np.asarray(r["expr_image"], np.int32) + o for r, o in zip(records, offsets)]
                                ) if records else np.zeros(0, np.int32)
    if not len(expr_image):
        raise ValueError("the simulator produced no expressions for these seeds")
    texts_raw = cat("texts")
    unique = sorted(set(texts_raw) | {mirror_text(t) for t in texts_raw})
    lookup = {t: i for i, t in enumerate(unique)}
    feats, lengths = text_features(encoder, unique, device, chunk=_chunk(device))
    instance = np.asarray(cat("instance"), np.int64)
    other = np.full(len(expr_image), -1, np.int32)
    rng = np.random.default_rng(0)
    starts = np.flatnonzero(np.r_[True, expr_image[1:] != expr_image[:-1]])   # an image's expressions are adjacent
    for idx in np.split(np.arange(len(expr_image)), starts[1:]):
        for i in idx:
            choices = idx[instance[idx] != instance[i]]
            if len(choices):
                other[i] = rng.choice(choices)
    split = GroundingSplit(
        images=np.stack(cat("images")), image_seed=np.repeat([r["seed"] for r in records],
                                                             [len(r["images"]) for r in records]).astype(np.int32),
        present=np.stack(cat("present")), expr_image=expr_image,
        text_index=np.asarray([lookup[t] for t in texts_raw], np.int32),
        mirror_index=np.asarray([lookup[mirror_text(t)] for t in texts_raw], np.int32),
        boxes=np.asarray(cat("boxes"), np.float32), packed_masks=np.stack(cat("masks")),
        hops=np.asarray(cat("hops"), np.int8), instance=instance, other=other, texts=np.asarray(unique),
        text_feats=feats, text_len=lengths)
    negatives = cat("negatives")
    return split, (_negative_texts(negatives, encoder, device) if negatives else None)


def _chunk(device: str | torch.device) -> int:
    return 1024 if torch.device(device).type == "cuda" else 64


def render_split(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                 rig: str = "default", log=print, every: int = EVERY, workers: int = 0) -> GroundingSplit:
    """Simulate `seeds` (`workers` > 1: that many at a time), keep every camera image that has expressions;
    `size` (h, w) resizes images and masks (None keeps full size, for evaluation)."""
    return _assemble(_render_seeds(seeds, seconds, expressions, size, rig, every, workers=workers, log=log),
                     encoder)[0]


def render_with_negatives(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                          rig: str = "default", log=print, workers: int = 0, device: str | torch.device = "cpu"
                          ) -> tuple[GroundingSplit, tuple]:
    """`render_split` and, from the same run of the simulator, the relation negatives of its expressions:
    (split, found); `with_negatives(split, *found)` merges them, `NEGATIVE_KEYS` name found's parts for a
    cache. Token features are encoded on `device`."""
    return _assemble(_render_seeds(seeds, seconds, expressions, size, rig, EVERY, relation=True, workers=workers,
                                   log=log), encoder, device)


def with_negatives(split: GroundingSplit, texts: np.ndarray, feats: np.ndarray, lengths: np.ndarray,
                    local: np.ndarray) -> tuple[GroundingSplit, np.ndarray]:
    """The split with the negatives' texts and features appended and (E,) each expression's negative's
    text id in it (-1: none)."""
    if len(local) != len(split):
        raise ValueError(f"relation negatives for {len(local)} expressions, the split has {len(split)}")
    if not len(texts):
        return split, local
    merged = replace(split, texts=np.concatenate([split.texts.astype(object), texts]).astype(str),
                     text_feats=np.concatenate([split.text_feats, feats]),
                     text_len=np.concatenate([split.text_len, lengths]))
    return merged, np.where(local >= 0, local + len(split.texts), -1).astype(np.int32)


NEGATIVE_KEYS = ("texts", "feats", "lengths", "index")


def relation_negatives(split: GroundingSplit, seeds, seconds: float, expressions: int, encoder,
                       rig: str = "default", every: int = EVERY, cache: Path | None = None, workers: int = 0
                       ) -> tuple[GroundingSplit, np.ndarray]:
    """Per expression of `split` (rendered by `render_split` with these arguments) a command whose object and
    anchor are both in the image but not in the named relation (`sim.language.relation_negative`: "the red
    car left of the bus" where the only red car is right of it). The simulator is re-run for `seeds`
    (`workers` at a time) and must give the split's expressions in the split's order (ValueError otherwise);
    `cache` (an .npz path) keeps the negatives' texts and features for the next call. Returns (the split
    with the negatives' texts and features appended, (E,) the text id of each expression's negative, -1
    where the expression has no relation or turning it around still names an object)."""
    if cache is not None and Path(cache).exists():
        with np.load(cache, allow_pickle=False) as data:
            found = tuple(data[k] for k in NEGATIVE_KEYS)
        if len(found[-1]) != len(split):
            raise ValueError(f"relation_negatives: {cache} holds {len(found[-1])} expressions, the split {len(split)}")
        return with_negatives(split, *found)
    records = _render_seeds(seeds, seconds, expressions, None, rig, every, images=False, relation=True,
                            workers=workers, log=lambda *_: None)
    if [t for r in records for t in r["texts"]] != [str(split.texts[i]) for i in split.text_index]:
        raise ValueError("relation_negatives: the simulator's expressions are not the split's (other seeds, "
                         "seconds or expressions than it was rendered with?)")
    found = _negative_texts([n for r in records for n in r["negatives"]], encoder)
    if cache is not None:
        np.savez(cache, **dict(zip(NEGATIVE_KEYS, found)))
    return with_negatives(split, *found)


def cache_path(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, rig: str, encoder) -> Path:
    key = json.dumps({"seeds": [int(s) for s in seeds], "seconds": seconds, "expressions": expressions, "every": EVERY,
                      "size": size, "rig": rig, "text": str(encoder.model_dir), "format": FORMAT})
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    kind = "full" if size is None else f"{size[1]}x{size[0]}"
    return CACHE_DIR / f"split_{kind}_{digest}.npz"


def load_or_render(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                   rig: str = "default", log=print, workers: int = 0) -> GroundingSplit:
    """The cached split for these arguments, rendering it first (`workers` seeds at a time) when absent.
    Seeds in several runs ("0-799,1100-1899") are cached run by run and joined (`GroundingSplit.load_concat`),
    so a run rendered for one split serves every split that contains it."""
    seeds = list(seeds)
    runs = seed_runs(seeds)
    if len(runs) > 1:
        paths = []
        for run in runs:
            path = cache_path(run, seconds, expressions, size, rig, encoder)
            if not path.exists():
                load_or_render(run, seconds, expressions, size, encoder, rig, log, workers)
            paths.append(path)
        log(f"[grounding data] joining {len(paths)} cached runs of seeds")
        return GroundingSplit.load_concat(paths)
    path = cache_path(seeds, seconds, expressions, size, rig, encoder)
    if path.exists():
        log(f"[grounding data] cached {path}")
        return GroundingSplit.load(path)
    split = render_split(seeds, seconds, expressions, size, encoder, rig, log, workers=workers)
    split.save(path)
    log(f"[grounding data] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return split


def load_with_negatives(seeds, seconds: float, expressions: int, size: tuple[int, int] | None, encoder,
                        rig: str = "default", log=print, workers: int = 0) -> tuple[GroundingSplit, np.ndarray]:
    """`load_or_render` and the split's `relation_negatives` (cached beside it): (split, negatives). With
    neither cached, both come from one run of the simulator. Seeds in several runs: cached run by run and
    joined, as in `load_or_render`."""
    seeds = list(seeds)
    runs = seed_runs(seeds)
    if len(runs) > 1:
        found = []
        for run in runs:
            path = cache_path(run, seconds, expressions, size, rig, encoder)
            negatives_path = path.with_suffix(".relation_negatives.npz")
            if not (path.exists() and negatives_path.exists()):
                load_with_negatives(run, seconds, expressions, size, encoder, rig, log, workers)
            with np.load(negatives_path, allow_pickle=False) as data:
                found.append(tuple(data[k] for k in NEGATIVE_KEYS))
        split = load_or_render(seeds, seconds, expressions, size, encoder, rig, log, workers)
        # each run's negative ids count among its own negatives' texts: shifted past the earlier runs'
        shifts = np.cumsum([0] + [len(f[0]) for f in found[:-1]])
        index = np.concatenate([np.where(f[3] >= 0, f[3] + k, -1) for f, k in zip(found, shifts)]).astype(np.int32)
        return with_negatives(split, np.concatenate([f[0].astype(object) for f in found]).astype(str),
                              *(np.concatenate([f[i] for f in found]) for i in (1, 2)), index)
    path = cache_path(seeds, seconds, expressions, size, rig, encoder)
    negatives_path = path.with_suffix(".relation_negatives.npz")
    if path.exists() or negatives_path.exists():
        split = load_or_render(seeds, seconds, expressions, size, encoder, rig, log, workers)
        return relation_negatives(split, seeds, seconds, expressions, encoder, rig, cache=negatives_path,
                                  workers=workers)
    split, found = render_with_negatives(seeds, seconds, expressions, size, encoder, rig, log, workers)
    split.save(path)
    np.savez(negatives_path, **dict(zip(NEGATIVE_KEYS, found)))
    log(f"[grounding data] wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and its relation negatives")
    return with_negatives(split, *found)


if __name__ == "__main__":  # pragma: no cover - manual pre-render: python -m vg_ros.grounding.data 0-39 2.0 8
    from vg_ros.grounding.text import TextEncoder
    load_or_render(parse_seeds(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), (144, 256), TextEncoder())
