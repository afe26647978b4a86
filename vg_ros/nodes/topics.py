"""Topic names as the nodes resolve them: image transports, namespaces, CameraInfo beside its image."""
from __future__ import annotations

from typing import Any

IMAGE_TRANSPORTS = ("raw", "compressed")


def camera_topic(topic: str, transport: str) -> str:
    """The topic a camera's images come on: `topic` for raw sensor_msgs/Image; for compressed
    (sensor_msgs/CompressedImage, jpeg or png) `topic/compressed`, as image_transport names it, unless
    `topic` already ends so. ValueError for another transport."""
    if transport not in IMAGE_TRANSPORTS:
        raise ValueError(f"image_transport = {transport!r}: must be one of {list(IMAGE_TRANSPORTS)}")
    if transport == "raw" or topic.rstrip("/").endswith("/compressed"):
        return topic
    return topic.rstrip("/") + "/compressed"


TOPIC_LIST_PARAMS = ("extra_image_topics",)
# topics that stay global whatever the namespace (the player, `vg-ros play --namespace`, leaves them alone)
GLOBAL_TOPICS = frozenset({"/clock", "/tf", "/tf_static", "/diagnostics", "/rosout", "/parameter_events"})


def normalize_namespace(namespace: str) -> str:
    """'robot1', '/robot1/' or '/fleet/robot1' -> '/robot1', '/fleet/robot1'; '' or '/' -> '/'. ValueError
    for a name ROS would refuse (tokens of letters, digits and '_', not starting with a digit)."""
    tokens = [t for t in str(namespace).strip().split("/") if t]
    for token in tokens:
        if not (token[0].isalpha() or token[0] == "_") or not all(c.isalnum() or c == "_" for c in token) \
                or not token.isascii():
            raise ValueError(f"namespace {namespace!r}: {token!r} is not a valid ROS name token "
                             "(letters, digits and '_', not starting with a digit)")
    return "/" + "/".join(tokens)


def global_topic(topic: str, namespace: str = "/") -> str:
    """The fully qualified name of a data topic as a node in `namespace` resolves it: an absolute name
    stays, a relative one (the defaults: `lidar/points`) goes under the namespace, so `namespace:=robot1`
    moves a node's inputs and outputs to /robot1/...; '' (an output turned off) stays ''. Replay and the
    recorder read bags with absolute names: they resolve the parameters with this, namespace "/"."""
    topic = str(topic)
    if not topic or topic.startswith("/"):
        return topic
    if topic.startswith("~"):
        raise ValueError(f"topic {topic!r}: a data topic cannot be private to a node (~); use a relative name")
    return namespace.rstrip("/") + "/" + topic


def global_topics(params: dict[str, Any], namespace: str = "/") -> dict[str, Any]:
    """`params` with every topic parameter (`*_topic`, `*_topic_pattern`, `extra_image_topics`) resolved by
    `global_topic`."""
    out = dict(params)
    for key, value in params.items():
        if key.endswith(("_topic", "_topic_pattern")) and isinstance(value, str):
            out[key] = global_topic(value, namespace)
        elif key in TOPIC_LIST_PARAMS and value:
            out[key] = [global_topic(str(t), namespace) for t in value]
    return out


def camera_info_sibling(image_topic: str) -> str:
    """The CameraInfo topic beside an image topic, as image_transport's camera subscriber pairs them:
    /cameras/X/image_raw (or its transport topic /cameras/X/image_raw/compressed) -> /cameras/X/camera_info."""
    topic = str(image_topic).rstrip("/")
    topic = topic[:-len("/compressed")] if topic.endswith("/compressed") else topic
    head, _, _ = topic.rpartition("/")
    return f"{head}/camera_info" if head or str(image_topic).startswith("/") else "camera_info"
