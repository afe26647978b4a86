"""CLEVR-Ref+-style referring expressions about objects visible in one simulated camera image.

An object is *visible* when it has >= `min_pixels` pixels in the instance map and its box is >= `min_box` px
on both sides. Expressions name a target through attributes (colour, kind, size), image-space relations
(left of / right of by box centre, in front of / behind by median depth) and superlatives (nearest, farthest,
leftmost, rightmost), in zero-, one- and two-hop templates with synonyms. The target is always the unique
visible object satisfying the expression, with a clear margin to every look-alike (no near ties).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vg_ros.sim.world import REFERABLE_KINDS, World
from vg_ros.types import Expression

NOUNS = {
    "car": ("car", "vehicle", "automobile"),
    "truck": ("truck", "lorry"),
    "bus": ("bus", "coach"),
    "pedestrian": ("person", "pedestrian", "man walking"),
    "cyclist": ("cyclist", "bicyclist", "person on a bike"),
    "cone": ("traffic cone", "cone"),
    "barrier": ("barrier", "road barrier"),
    "pole": ("pole", "post"),
}
RELATIONS = {
    "left": ("left of", "to the left of", "on the left side of"),
    "right": ("right of", "to the right of", "on the right side of"),
    "front": ("in front of", "closer than", "nearer than"),
    "behind": ("behind", "farther away than", "further away than"),
}
SUPERLATIVES = {
    "nearest": ("nearest", "closest"),
    "farthest": ("farthest", "most distant"),
    "leftmost": ("leftmost",),
    "rightmost": ("rightmost",),
}
PIXEL_MARGIN = 8.0     # left/right: box centres must differ by this many pixels
DEPTH_MARGIN = 1.5     # in front / behind: median depths must differ by this many metres
HOP_MIX = (0.4, 0.4, 0.2)
FALLBACK = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 1, 0)}   # hop counts tried when the drawn one is impossible
MAX_TRIES = 12         # candidates tried per search level, so busy images stay cheap (2-hop is cubic)


@dataclass
class VisibleObject:
    """A referable object as seen in one image: `box` (x0, y0, x1, y1) with x1, y1 exclusive; `cx` box centre
    column; `depth` median z-depth of its pixels (m)."""

    instance_id: int
    kind: str
    colour: str
    size: str
    pixels: int
    box: np.ndarray
    cx: float
    depth: float


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) float64 of a (H, W) bool mask, x1/y1 exclusive (all mask pixels lie inside);
    zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return np.zeros(4)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


def visible_objects(world: World, instance: np.ndarray, depth: np.ndarray, *, min_pixels: int = 150,
                    min_box: int = 12) -> list[VisibleObject]:
    """Referable objects visible in one image. `instance` (H, W) int32, `depth` (H, W) float32."""
    ids, counts = np.unique(instance[instance > 0], return_counts=True)
    by_id = {o.instance_id: o for o in world.objects if o.instance_id}
    out = []
    for iid, n in zip(ids.tolist(), counts.tolist()):
        obj = by_id.get(iid)
        if obj is None or obj.kind not in REFERABLE_KINDS or n < min_pixels:
            continue
        mask = instance == iid
        box = mask_box(mask)
        if box[2] - box[0] < min_box or box[3] - box[1] < min_box:
            continue
        out.append(VisibleObject(iid, obj.kind, obj.colour, obj.size, n, box, float((box[0] + box[2]) / 2),
                                 float(np.median(depth[mask]))))
    return out


# ----------------------------------------------------------------------------------------------------------


_ATTR_SETS = ((), ("colour",), ("size",), ("size", "colour"))


def _matches(o: VisibleObject, kind: str, attrs: dict) -> bool:
    return o.kind == kind and all(getattr(o, k) == v for k, v in attrs.items())


def _phrase(kind: str, attrs: dict, rng: np.random.Generator, superlative: str = "") -> str:
    words = []
    if superlative:
        words.append(str(rng.choice(SUPERLATIVES[superlative])))
    if "size" in attrs:
        words.append(attrs["size"])
    if "colour" in attrs:
        words.append(attrs["colour"])
    words.append(str(rng.choice(NOUNS[kind])))
    return "the " + " ".join(words)


def _descriptions(o: VisibleObject) -> list[dict]:
    return [{k: getattr(o, k) for k in ks} for ks in _ATTR_SETS]


def _rel_value(o: VisibleObject, rel: str) -> float:
    return o.cx if rel in ("left", "right") else o.depth


def _rel_holds(o: VisibleObject, anchor: VisibleObject, rel: str) -> bool:
    a, b = _rel_value(o, rel), _rel_value(anchor, rel)
    return a < b if rel in ("left", "front") else a > b


def _rel_clear(o: VisibleObject, anchor: VisibleObject, rel: str) -> bool:
    margin = PIXEL_MARGIN if rel in ("left", "right") else DEPTH_MARGIN
    return abs(_rel_value(o, rel) - _rel_value(anchor, rel)) >= margin


def _unique_zero_hop(objs: list[VisibleObject], target: VisibleObject, rng: np.random.Generator) -> tuple | None:
    """A (kind, attrs, superlative) that picks `target` alone among `objs`, or None."""
    options = []
    for attrs in _descriptions(target):
        same = [o for o in objs if _matches(o, target.kind, attrs)]
        if len(same) == 1:
            options.append((target.kind, attrs, ""))
        elif len(same) > 1:
            for sup in SUPERLATIVES:
                key = (lambda o: o.depth) if sup in ("nearest", "farthest") else (lambda o: o.cx)
                ordered = sorted(same, key=key, reverse=sup in ("farthest", "rightmost"))
                margin = DEPTH_MARGIN if sup in ("nearest", "farthest") else PIXEL_MARGIN
                if ordered[0] is target and abs(key(ordered[0]) - key(ordered[1])) >= margin:
                    options.append((target.kind, attrs, sup))
    if not options:
        return None
    # Prefer the shortest descriptions most of the time, but not always (redundant attributes happen).
    plain = [o for o in options if not o[2]]
    pool = plain if plain and rng.random() < 0.7 else options
    pool = sorted(pool, key=lambda o: len(o[1]))
    k = 0 if rng.random() < 0.6 else int(rng.integers(len(pool)))
    return pool[k]


def _relation_options(objs, target, anchor, rng) -> list[tuple[dict, str]]:
    """(attrs, rel) such that `target` is the unique object matching attrs and rel(anchor), with margins."""
    out = []
    for rel in RELATIONS:
        if not (_rel_holds(target, anchor, rel) and _rel_clear(target, anchor, rel)):
            continue
        for attrs in _descriptions(target):
            same = [o for o in objs if o is not anchor and _matches(o, target.kind, attrs)]
            if any(not _rel_clear(o, anchor, rel) for o in same):
                continue  # a look-alike too close to the anchor to judge
            hits = [o for o in same if _rel_holds(o, anchor, rel)]
            if hits == [target]:
                out.append((attrs, rel))
    return out


def _expr_zero(objs, target, rng):
    d = _unique_zero_hop(objs, target, rng)
    if d is None:
        return None
    return _phrase(d[0], d[1], rng, d[2])


def _pick_relation(objs, target, opts, rng) -> tuple[dict, str]:
    """One of `opts`, preferring those where the relation is needed (the attributes alone are ambiguous)."""
    needed = [o for o in opts if sum(_matches(x, target.kind, o[0]) for x in objs) > 1]
    pool = needed if needed and rng.random() < 0.8 else opts
    return pool[int(rng.integers(len(pool)))]


def _expr_one(objs, target, rng, exclude: frozenset = frozenset()):
    anchors = [o for o in objs if o is not target and o.instance_id not in exclude]
    rng.shuffle(anchors)
    for anchor in anchors[:MAX_TRIES]:
        ad = _unique_zero_hop(objs, anchor, rng)
        if ad is None or ad[2]:
            continue
        opts = _relation_options(objs, target, anchor, rng)
        if not opts:
            continue
        attrs, rel = _pick_relation(objs, target, opts, rng)
        return f"{_phrase(target.kind, attrs, rng)} {rng.choice(RELATIONS[rel])} {_phrase(ad[0], ad[1], rng)}"
    return None


def _expr_two(objs, target, rng):
    mids = [o for o in objs if o is not target]
    rng.shuffle(mids)
    for mid in mids[:MAX_TRIES]:
        opts = _relation_options(objs, target, mid, rng)
        if not opts:
            continue
        mid_text = _expr_one(objs, mid, rng, exclude=frozenset({target.instance_id}))  # no circular chains
        if mid_text is None:
            continue
        attrs, rel = _pick_relation(objs, target, opts, rng)
        return f"{_phrase(target.kind, attrs, rng)} {rng.choice(RELATIONS[rel])} {mid_text}"
    return None


def describe(objs: list[VisibleObject], target: VisibleObject, rng: np.random.Generator,
             hops: int | None = None) -> tuple[str, int] | None:
    """(text, hops) naming `target` uniquely among `objs`; `hops` None draws 0/1/2 by HOP_MIX and falls back
    to other hop counts when the scene does not allow the drawn one."""
    makers = (_expr_zero, _expr_one, _expr_two)
    first = int(rng.choice(3, p=HOP_MIX)) if hops is None else int(hops)
    if not 0 <= first <= 2:
        raise ValueError(f"hops: must be 0, 1 or 2, got {hops}")
    order = [first] + [h for h in (0, 1, 2) if h != first] if hops is None else [first]
    for h in order:
        text = makers[h](objs, target, rng)
        if text is not None:
            return text, h
    return None


def make_expressions(world: World, camera: str, instance: np.ndarray, depth: np.ndarray, rng: np.random.Generator,
                     count: int, stamp_ns: int = 0, *, min_pixels: int = 150, min_box: int = 12) -> list[Expression]:
    """Up to `count` expressions about distinct visible objects of one image (`instance`, `depth` (H, W))."""
    objs = visible_objects(world, instance, depth, min_pixels=min_pixels, min_box=min_box)
    out: list[Expression] = []
    used: set[int] = set()
    while len(out) < count and len(used) < len(objs):
        # Draw the hop count first, then look for a target that supports it, so that sparse scenes do not
        # skew the mixture toward zero-hop; fall back to the other hop counts only when no target allows it.
        drawn = int(rng.choice(3, p=HOP_MIX))
        found = None
        for hops in FALLBACK[drawn]:
            for k in rng.permutation(len(objs))[:MAX_TRIES]:
                target = objs[int(k)]
                if target.instance_id in used:
                    continue
                res = describe(objs, target, rng, hops=hops)
                if res is not None:
                    found = (target, res[0], hops)
                    break
            if found:
                break
        if found is None:
            break
        target, text, hops = found
        used.add(target.instance_id)
        mask = instance == target.instance_id
        out.append(Expression(text=text, camera=camera, instance_id=target.instance_id, box=mask_box(mask),
                              mask=mask, hops=hops, stamp_ns=stamp_ns))
    return out


def descriptors() -> tuple[tuple[str, str, str], ...]:
    """Every (kind, colour, size) a referable object can have; `present_descriptors` and `phrase_descriptors`
    index into this tuple."""
    from vg_ros.sim.world import COLOUR_NAMES
    return tuple((k, c, s) for k in REFERABLE_KINDS for c in COLOUR_NAMES for s in ("small", "large"))


def present_descriptors(world: World, instance: np.ndarray) -> np.ndarray:
    """(len(descriptors()),) bool: which (kind, colour, size) has at least one pixel in the image's
    `instance` map (H, W) — however little of it shows, unlike `visible_objects`."""
    index = {d: i for i, d in enumerate(descriptors())}
    by_id = {o.instance_id: o for o in world.objects if o.instance_id}
    out = np.zeros(len(index), bool)
    for iid in np.unique(instance[instance > 0]).tolist():
        obj = by_id.get(iid)
        if obj is not None and (obj.kind, obj.colour, obj.size) in index:
            out[index[(obj.kind, obj.colour, obj.size)]] = True
    return out


def phrase_descriptors(expression: str) -> np.ndarray:
    """(len(descriptors()),) bool: the (kind, colour, size) that the expression's target noun phrase ("the
    large red car" in "the large red car left of the bus") admits. An image where none of them is present
    holds no object the expression could mean, whatever its relations say."""
    kind, attrs, _, _ = _parse_np(expression.split())
    return np.array([k == kind and attrs.get("colour", c) == c and attrs.get("size", s) == s
                     for k, c, s in descriptors()], bool)


OPPOSITE = {"left": "right", "right": "left", "front": "behind", "behind": "front"}


def relation_negative(objs: list[VisibleObject], expression: str, rng: np.random.Generator) -> str | None:
    """The expression with its first relation turned around ("the red car left of the bus" -> "the red car
    right of the bus"), when that names nothing among `objs` while its anchor still names one object: a
    command whose object and anchor are both in the image, but not in that relation. None for zero-hop
    expressions and where the turned relation would still name something."""
    words = expression.split()
    _, _, _, n = _parse_np(words)
    rest = words[n:]
    found = _relation_at(rest)
    if found is None:
        return None
    anchor = " ".join(rest[found[1]:])
    if len(_parse_and_filter(objs, anchor)) != 1:
        return None
    text = " ".join(words[:n] + [str(rng.choice(RELATIONS[OPPOSITE[found[0]]]))] + rest[found[1]:])
    return text if not _parse_and_filter(objs, text) else None


def resolve(text_objs: list[VisibleObject], expression: str) -> list[int]:
    """Instance ids satisfying a generated expression among `text_objs` (a small parser for the templates
    above, used by tests to check uniqueness independently of the generator)."""
    return [o.instance_id for o in _parse_and_filter(text_objs, expression)]


def _parse_np(words: list[str]) -> tuple[str, dict, str, int]:
    """Parse 'the [sup] [size] [colour] noun' at the start of `words` -> (kind, attrs, sup, n_words)."""
    if not words or words[0] != "the":
        raise ValueError(f"expression: expected 'the' at {' '.join(words)!r}")
    i = 1
    sup = ""
    for name, syns in SUPERLATIVES.items():
        for syn in syns:
            toks = syn.split()
            if words[i:i + len(toks)] == toks:
                sup, i = name, i + len(toks)
                break
        if sup:
            break
    attrs: dict = {}
    if i < len(words) and words[i] in ("small", "large"):
        attrs["size"] = words[i]
        i += 1
    from vg_ros.sim.world import COLOUR_NAMES
    if i < len(words) and words[i] in COLOUR_NAMES:
        attrs["colour"] = words[i]
        i += 1
    best = None
    for kind, syns in NOUNS.items():
        for syn in syns:
            toks = syn.split()
            if words[i:i + len(toks)] == toks and (best is None or len(toks) > best[1]):
                best = (kind, len(toks))
    if best is None:
        raise ValueError(f"expression: no noun at {' '.join(words[i:])!r}")
    return best[0], attrs, sup, i + best[1]


def _relation_at(words: list[str]) -> tuple[str, int] | None:
    """(relation name, its word count) of the longest relation phrase `words` start with, or None."""
    found = None
    for name, syns in RELATIONS.items():
        for syn in syns:
            toks = syn.split()
            if words[:len(toks)] == toks and (found is None or len(toks) > found[1]):
                found = (name, len(toks))
    return found


def _parse_and_filter(objs: list[VisibleObject], text: str) -> list[VisibleObject]:
    words = text.split()
    kind, attrs, sup, n = _parse_np(words)
    cands = [o for o in objs if _matches(o, kind, attrs)]
    rest = words[n:]
    if rest:
        rel = _relation_at(rest)
        if rel is None:
            raise ValueError(f"expression: no relation at {' '.join(rest)!r}")
        anchors = _parse_and_filter(objs, " ".join(rest[rel[1]:]))
        if len(anchors) != 1:
            return []
        cands = [o for o in cands if o is not anchors[0] and _rel_holds(o, anchors[0], rel[0])]
    if sup and cands:
        key = (lambda o: o.depth) if sup in ("nearest", "farthest") else (lambda o: o.cx)
        pick = (min if sup in ("nearest", "leftmost") else max)(cands, key=key)
        cands = [pick]
    return cands
