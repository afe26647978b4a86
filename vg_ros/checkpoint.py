"""Model checkpoints as safetensors: the state dict plus string metadata carrying the architecture.

One place for what the three capabilities share: files are never unpickled, and every way a checkpoint can
be unusable (missing, not a safetensors file, truncated, written by something else, another architecture)
is a `ValueError` that names the file, which CLIs print as one line and nodes log as a failed configure.

    save_state(model, path, {"spec": json.dumps(spec), "steps": 1200})
    state, meta = read_state(path, required="spec", kind="grounding")
    load_into(model, state, path)
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def save_state(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Write `model.state_dict()` (on the CPU, contiguous) with `metadata` (values stringified)."""
    from safetensors.torch import save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def read_state(path: str | Path, required: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a checkpoint whose metadata has the key `required`; `kind` names the
    model in errors ("occupancy", "grounding", "registration")."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{kind} weights: {path} does not exist (train them: vg-ros train {kind})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"{kind} weights {path}: not a readable safetensors file ({exc})") from exc
    if required not in meta:
        raise ValueError(f"{kind} weights {path}: no `{required}` metadata; not written by our train.py")
    return state, meta


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, kind: str) -> None:
    """Load `state` into `model`, strictly: a missing, extra or wrongly shaped tensor is a ValueError."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{kind} weights {path} do not match the model: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"{kind} weights {path} do not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
