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
