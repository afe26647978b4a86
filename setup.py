"""ament_python build of vg_ros: `colcon build` in a ROS 2 workspace, or `pip install -e .` in a virtualenv."""
from glob import glob

from setuptools import find_packages, setup

package_name = "vg_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench", "bench.*"]),
    package_data={"vg_ros": ["weights/*.safetensors", "weights/*.md", "weights/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
        ("share/" + package_name + "/msg", glob("msg/*.msg")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="vg_ros engineers",
    maintainer_email="vg-ros@example.org",
    description="ROS 2 perception: TPVFormer occupancy, VBReg LiDAR registration, VG-LAW visual grounding.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "vg-ros = vg_ros.cli:main",
            "occupancy_node = vg_ros.nodes.occupancy_node:main",
            "registration_node = vg_ros.nodes.registration_node:main",
            "grounding_node = vg_ros.nodes.grounding_node:main",
        ],
    },
)
