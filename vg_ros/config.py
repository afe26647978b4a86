"""One dataclass per pipeline holds its parameters: defaults, descriptions and ranges live here once.

Nodes declare ROS parameters from the dataclass (`declare_ros_parameters`); replay and the CLI fill it
from the same `config/perception.yaml` (`load_section`). A bad value raises ValueError naming the key
and the allowed range.

    @dataclass
    class RegistrationConfig(PipelineConfig):
        tau: float = param(0.1, "inlier threshold (m)", low=1e-4, high=10.0)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="PipelineConfig")


def param(default: Any, description: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None) -> Any:
    """A dataclass field carrying its ROS parameter description and allowed range or choices."""
    meta = {"description": description, "low": low, "high": high, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class PipelineConfig:
    """Base for pipeline configs: validation, dict round-trip, presets."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_value(type(self).__name__, f, value)

    @classmethod
    def from_dict(cls: type[C], values: dict | None, *, base: C | None = None) -> C:
        """Overlay `values` on the defaults (or on `base`). Unknown keys raise ValueError."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown parameter(s) {unknown}; known: {sorted(known)}")
        merged = dataclasses.asdict(base) if base is not None else {}
        for key, value in values.items():
            merged[key] = coerce(cls.__name__, known[key], value)
        return cls(**merged)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        return self.from_dict(changes, base=self)


def _field_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, type) else {"float": float, "int": int, "bool": bool, "str": str}.get(
        str(f.type).split("|")[0].strip(), object)
    return t


def coerce(owner: str, f: dataclasses.Field, value: Any) -> Any:
    """YAML and ROS give ints for floats and so on; convert where lossless, else ValueError."""
    t = _field_type(f)
    try:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
    except (TypeError, ValueError):
        pass
    if t in (float, int, bool, str) and not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ValueError(f"{owner}.{f.name}: expected {t.__name__}, got {value!r}")
    return value


def check_value(owner: str, f: dataclasses.Field, value: Any) -> None:
    low, high, choices = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{owner}.{f.name} = {value!r}: must be one of {list(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            raise ValueError(f"{owner}.{f.name} is NaN")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{owner}.{f.name} = {value!r}: must be in [{low}, {high}]")


def default_config_path() -> Path:
    from vg_ros.types import Rig
    return Rig.config_dir() / "perception.yaml"


def load_section(path: str | Path | None, node_name: str) -> dict:
    """The `ros__parameters` of `node_name` in a ROS 2 params file (also accepts `/**`)."""
    path = Path(path) if path else default_config_path()
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    data = read_params_file(path)
    params: dict = {}
    for key in ("/**", node_name, "/" + node_name):
        section = data.get(key) or {}
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters") or {}, dict):
            raise ValueError(f"config file {path}: section {key!r} must be a mapping with a `ros__parameters` "
                             f"mapping, got {section!r}")
        params.update(section.get("ros__parameters") or {})
    return params


def read_params_file(path: str | Path) -> dict:
    """A ROS 2 params file's top-level mapping; ValueError naming the file when it cannot be read as one (a
    folder, no permission, not UTF-8, a YAML syntax error, a top level that is not a mapping)."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ValueError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"config file {path}: not a YAML parameters file ({detail})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping of node names")
    return data


NODE_NAMES = ("occupancy_node", "registration_node", "grounding_node")


def unknown_sections(path: str | Path) -> list[str]:
    """Top-level keys of a params file that no vg_ros node reads: not `/**`, not a node name (bare, or under a
    namespace: `/robot1/grounding_node`). A typo there (`registraton_node:`) would leave that node on its
    defaults without a word."""
    data = read_params_file(path)
    return [str(key) for key in data if key != "/**" and str(key).rstrip("/").split("/")[-1] not in NODE_NAMES]


def split_params(params: dict, cls: type[PipelineConfig]) -> tuple[dict, dict]:
    """(values for `cls`, the rest) — nodes keep topic names and QoS beside the pipeline config."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names}


def declare_ros_parameters(node: Any, cfg: PipelineConfig, prefix: str = "") -> PipelineConfig:
    """Declare every field of `cfg` on an rclpy node (description, range) and read back the values.

    Overrides given at launch (params file, `-p`) win over the dataclass's values.
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        desc = ParameterDescriptor(description=f.metadata.get("description", ""))
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if isinstance(value, float) and low is not None and high is not None:
            desc.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
        elif isinstance(value, int) and not isinstance(value, bool) and low is not None and high is not None:
            desc.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=0)]
        if f.metadata.get("choices"):
            desc.additional_constraints = f"one of {list(f.metadata['choices'])}"
        declared = node.declare_parameter(prefix + f.name, value, desc)
        values[f.name] = declared.value
    return type(cfg).from_dict(values)
