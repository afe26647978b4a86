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
    if key := non_finite_tensor(state):   # a diverged run: nothing written, the previous file (shipped?) stays
        raise ValueError(f"not writing {path}: tensor {key} holds NaN or inf (the training diverged; a lower --lr?)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def read_state(path: str | Path, required: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a checkpoint whose metadata has the key `required`; `kind` names the
    model in errors ("occupancy", "grounding", "registration")."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{kind} weights: {path} is a directory, not a .safetensors file")
    if not path.is_file():
        raise ValueError(f"{kind} weights: {path} does not exist (train them: vg-ros train {kind})")
    try:
        state, meta = _read_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"{kind} weights {path}: not a readable safetensors file ({exc})") from exc
    if required not in meta:
        raise ValueError(f"{kind} weights {path}: no `{required}` metadata; not written by our train.py")
    if key := non_finite_tensor(state):   # a diverged or corrupted file would give NaN boxes and poses
        raise ValueError(f"{kind} weights {path}: tensor {key} holds NaN or inf (a diverged training run or "
                         "a corrupt file)")
    return state, meta


def non_finite_tensor(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding NaN or inf, else None."""
    return next((key for key, tensor in state.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, read through one open handle. Raises safetensors' own
    errors for a corrupt file; the callers name the file and what it should have been."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, kind: str) -> None:
    """Load `state` into `model`, strictly: a missing, extra or wrongly shaped tensor is a ValueError."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists every tensor, a line each (154 for occupancy)
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ValueError(f"{kind} weights {path} do not match the model (another size or config?): "
                         f"{lines[0] if lines else exc}{more}") from exc
    if missing or unexpected:
        raise ValueError(f"{kind} weights {path} do not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


# -- resumable training state ---------------------------------------------------------------------------------

TRAINING_STATE_FORMAT = "vg_ros.training_state/1"


def save_training_state(path: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        record: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """A resumable snapshot of a training run as one safetensors file (never pickled): each module's state
    dict under its name ("model.<key>"), the optimizer's per-parameter tensors ("optimizer.<index>.<key>"),
    any extra `tensors` ("extra.<key>", e.g. random generator states), and `record` (JSON: the step, the
    elapsed time, the run's arguments) with the optimizer's hyper-parameters in the metadata. Written to a
    temporary file and renamed into place: a run killed while saving keeps the previous snapshot."""
    import json
    import os

    from safetensors.torch import save_file

    flat = {f"{name}.{k}": v.detach().cpu().contiguous().clone()
            for name, module in modules.items() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                flat[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    flat.update({f"extra.{k}": v.detach().cpu().contiguous().clone() for k, v in (tensors or {}).items()})
    meta = {"format": TRAINING_STATE_FORMAT, "record": json.dumps(record), "modules": json.dumps(sorted(modules)),
            "param_groups": json.dumps(opt["param_groups"]), "optimizer_scalars": json.dumps(scalars)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(flat, str(partial), metadata=meta)
    os.replace(partial, path)


def read_training_state(path: str | Path) -> dict:
    """{"record": dict, "modules": {name: state dict}, "optimizer": an optimizer state dict, "extra": {key:
    tensor}} from `save_training_state`'s file; ValueError naming the file when it is missing, unreadable or
    not a training state."""
    import json

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"training state {path} is a folder; give the run's <name>.state.safetensors in it")
    if not path.is_file():
        raise ValueError(f"training state {path} does not exist")
    try:
        flat, meta = _read_safetensors(path)
        if meta.get("format") != TRAINING_STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {TRAINING_STATE_FORMAT!r}")
        names = json.loads(meta["modules"])
        record, groups = json.loads(meta["record"]), json.loads(meta["param_groups"])
        scalars = json.loads(meta["optimizer_scalars"])
    except Exception as exc:  # noqa: BLE001 - safetensors and json raise their own types for corrupt files
        raise ValueError(f"training state {path}: not a readable training state ({exc})") from exc
    modules: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    opt_state: dict[int, dict] = {}
    extra = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head == "optimizer":
            index, _, name = rest.partition(".")
            opt_state.setdefault(int(index), {})[name] = value
        elif head == "extra":
            extra[rest] = value
        elif head in modules:
            modules[head][rest] = value
        else:
            raise ValueError(f"training state {path}: unexpected tensor {key!r}")
    for key, value in scalars.items():
        index, _, name = key.partition(".")
        opt_state.setdefault(int(index), {})[name] = value
    for group in groups:   # JSON has no tuples
        group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    return {"record": record, "modules": modules, "optimizer": {"state": opt_state, "param_groups": groups},
            "extra": extra}
