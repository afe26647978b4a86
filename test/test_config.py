"""Pipeline config dataclasses: defaults, validation naming the key and range, params-file sections."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from vg_ros.config import PipelineConfig, load_section, param, split_params


@dataclass
class DemoConfig(PipelineConfig):
    tau: float = param(0.1, "inlier threshold (m)", low=1e-4, high=10.0)
    iterations: int = param(6, "network iterations", low=1, high=24)
    device: str = param("auto", "compute device", choices=("auto", "cpu", "cuda"))
    refine: bool = param(True, "run GICP refinement")


def test_defaults_and_overlay():
    cfg = DemoConfig.from_dict({"tau": 1, "iterations": 12.0})
    assert cfg.tau == 1.0 and isinstance(cfg.tau, float)
    assert cfg.iterations == 12 and isinstance(cfg.iterations, int)
    assert cfg.replace(refine=False).refine is False and cfg.refine is True


@pytest.mark.parametrize("values, match", [
    ({"tau": -1.0}, r"DemoConfig\.tau = -1.0: must be in \[0.0001, 10.0\]"),
    ({"iterations": 99}, r"iterations = 99"),
    ({"device": "tpu"}, r"device = 'tpu': must be one of"),
    ({"refine": "yes"}, r"refine: expected bool"),
    ({"taus": 1.0}, r"unknown parameter\(s\) \['taus'\]"),
    ({"tau": float("nan")}, r"tau is NaN"),
])
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig.from_dict(values)


def test_params_file_sections(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters: {use_sim_time: true}\n"
                    "demo_node:\n  ros__parameters: {tau: 0.5, topic: /x}\n")
    params = load_section(path, "demo_node")
    assert params == {"use_sim_time": True, "tau": 0.5, "topic": "/x"}
    pipeline, rest = split_params(params, DemoConfig)
    assert pipeline == {"tau": 0.5} and rest == {"use_sim_time": True, "topic": "/x"}
    with pytest.raises(ValueError, match="does not exist"):
        load_section(tmp_path / "missing.yaml", "demo_node")


def test_shipped_perception_yaml_parses():
    for node in ("occupancy_node", "registration_node", "grounding_node"):
        assert isinstance(load_section(None, node), dict)


def test_unreadable_params_files_are_one_value_error_naming_the_file(tmp_path):
    # a folder, a YAML syntax error, a binary file or a section that is not a mapping raised IsADirectoryError,
    # yaml.ParserError, AttributeError: tracebacks from `vg-ros replay --config` / `vg-ros up --config`
    from vg_ros.config import unknown_sections
    (tmp_path / "bad.yaml").write_text("registration_node: [\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x84\xff\x00 not text")
    (tmp_path / "section.yaml").write_text("registration_node: 5\n")
    (tmp_path / "params.yaml").write_text("registration_node:\n  ros__parameters: [1, 2]\n")
    for name, match in (("", "cannot read it"), ("bad.yaml", "not a YAML parameters file"),
                        ("binary.yaml", "not a YAML parameters file"), ("section.yaml", "section 'registration_node'"),
                        ("params.yaml", "section .* a `ros__parameters` mapping")):
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"config file {path}: {match}"):
            load_section(path, "registration_node")
    for name in ("", "bad.yaml", "binary.yaml"):
        with pytest.raises(ValueError, match="config file"):
            unknown_sections(tmp_path / name)
    # a section or a ros__parameters left empty (null in YAML) is a file with nothing to set, not an error
    (tmp_path / "empty.yaml").write_text("registration_node:\ngrounding_node:\n  ros__parameters:\n")
    assert load_section(tmp_path / "empty.yaml", "registration_node") == {}
    assert load_section(tmp_path / "empty.yaml", "grounding_node") == {}
