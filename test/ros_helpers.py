"""Reusable helpers for tests that start rclpy participants over real DDS, in-process.

Usage (each test gets a fresh `rclpy.Context`, its own executor and its own ROS_DOMAIN_ID):

    from ros_helpers import ros_session

    def test_something():
        with ros_session(domain_id=11) as ros:            # pick an id from your own range
            pub_node = ros.node("talker")
            sub_node = ros.node("listener")
            got = []
            sub_node.create_subscription(Image, "/img", got.append, 10)
            pub = pub_node.create_publisher(Image, "/img", 10)
            assert ros.wait_for_match(pub, timeout=3.0)  # discovery done: publish now
            pub.publish(msg)
            assert ros.spin_until(lambda: got, timeout=3.0)

    # a node under test (a class taking `context=`) can be added with `ros.add(node)`.

* `ros_session(domain_id=None)`: context manager -> `RosSession`; `domain_id` None takes $ROS_DOMAIN_ID.
  It sets nothing global: `rclpy.init(context=ctx, domain_id=...)`; on exit it destroys every node it made
  or was given and shuts the context down, even when the test fails.
* `RosSession.node(name, **kwargs)`: an `rclpy.node.Node` in this context, spun by this session's executor.
* `RosSession.add(node)`: spin a node built elsewhere (it must use `context=ros.context`).
* `RosSession.spin_until(predicate, timeout=5.0, step=0.02) -> bool`: spin until `predicate()` is truthy.
* `RosSession.spin_for(seconds)`: spin for a fixed time.
* `RosSession.wait_for_match(publisher, timeout=5.0, count=1) -> bool`: spin until the publisher sees
  `count` subscriptions (publish only after this, or the first messages may go nowhere).
* `RosSession.set_parameters(node_name, **values) -> [SetParametersResult]`: `ros2 param set` as a
  service call from another participant of this session, one result per value.
* `ros_session_fixture(domain_id)`: builds a pytest fixture, e.g. `ros = ros_session_fixture(12)` at module
  level gives tests a `ros` argument.

conftest.py already forces ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST; `./run test` adds a private netns.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest


class RosSession:
    """A fresh rclpy Context with a SingleThreadedExecutor; see the module docstring."""

    def __init__(self, context, executor):
        self.context = context
        self.executor = executor
        self.nodes: list = []

    def node(self, name: str, **kwargs):
        from rclpy.node import Node
        node = Node(name, context=self.context, **kwargs)
        return self.add(node)

    def add(self, node):
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def set_parameters(self, node_name: str, **values) -> list:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        client = self.node(f"param_client_{len(self.nodes)}").create_client(SetParameters,
                                                                            f"/{node_name}/set_parameters")
        assert self.spin_until(client.service_is_ready, timeout=10), f"/{node_name}/set_parameters never appeared"
        request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                    for k, v in values.items()])
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout=10), f"/{node_name}/set_parameters did not answer"
        return list(future.result().results)

    def spin_until(self, predicate: Callable[[], object], timeout: float = 5.0, step: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return bool(predicate())
            self.executor.spin_once(timeout_sec=step)

    def spin_for(self, seconds: float, step: float = 0.02) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=step)

    def wait_for_match(self, publisher, timeout: float = 5.0, count: int = 1) -> bool:
        return self.spin_until(lambda: publisher.get_subscription_count() >= count, timeout)


@contextmanager
def ros_session(domain_id: int | None = None) -> Iterator[RosSession]:
    """A fresh rclpy Context (+ executor) on `domain_id` (default $ROS_DOMAIN_ID), torn down on exit."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if domain_id is None:
        domain_id = int(os.environ.get("ROS_DOMAIN_ID", "0"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(domain_id))
    executor = SingleThreadedExecutor(context=ctx)
    session = RosSession(ctx, executor)
    try:
        yield session
    finally:
        for node in session.nodes:
            try:
                executor.remove_node(node)
                node.destroy_node()
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown(context=ctx)


def ros_session_fixture(domain_id: int):
    """A pytest fixture (function scope) yielding a RosSession on `domain_id`."""
    @pytest.fixture
    def ros():
        with ros_session(domain_id) as session:
            yield session
    return ros
