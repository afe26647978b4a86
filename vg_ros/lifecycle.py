"""`vg-ros lifecycle`: drive the perception nodes through the ROS 2 managed-node lifecycle, as `ros2 lifecycle
get / set` and Nav2's lifecycle_manager do on a ROS install (neither is on pip).

    vg-ros lifecycle get /registration_node /grounding_node
    vg-ros lifecycle startup registration_node          # configure (if needed), then activate
    vg-ros lifecycle deactivate /robot1/grounding_node
    vg-ros lifecycle shutdown registration_node         # the node's process then exits

Nodes started with `autostart:=false` (launch argument, `vg-ros up --no-autostart`, or the parameter)
wait unconfigured for this. Each node answers through its `~/get_state`, `~/change_state` and
`~/get_available_transitions` services. Exit code 0 when every transition succeeded, 1 when one failed
(the node's own log has the ERROR line), 2 when a node did not answer.
"""
from __future__ import annotations

import argparse
import os

TRANSITIONS = ("configure", "activate", "deactivate", "cleanup", "shutdown")
ACTIONS = ("get", "startup") + TRANSITIONS


def node_path(name: str) -> str:
    """'registration_node' -> '/registration_node'; absolute names as they are."""
    name = name.strip().rstrip("/")
    if not name or name == "/":
        raise ValueError("empty node name")
    return name if name.startswith("/") else "/" + name


class LifecycleClient:
    """The lifecycle services of one node, called from `node` (a plain rclpy node of the caller's, spun by
    `executor`)."""

    def __init__(self, node, executor, target: str, timeout_s: float = 10.0):
        from lifecycle_msgs.srv import ChangeState, GetAvailableTransitions, GetState
        self.node, self.executor, self.target, self.timeout_s = node, executor, target, timeout_s
        self._get = node.create_client(GetState, f"{target}/get_state")
        self._change = node.create_client(ChangeState, f"{target}/change_state")
        self._available = node.create_client(GetAvailableTransitions, f"{target}/get_available_transitions")

    def wait(self, changes: bool = True) -> bool:
        """The services are there and answer. A service can be discovered a moment before its reply can
        reach this caller (the reply is then lost), so each is first asked something harmless until it
        answers: the state, the transitions, and (`changes`: a transition will be asked for) a transition
        label no node has (answered success=false; rcl_lifecycle logs a WARN for it in the node's log)."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState, GetAvailableTransitions, GetState
        if not all(c.wait_for_service(timeout_sec=self.timeout_s) for c in (self._get, self._change, self._available)):
            return False
        try:
            probes = [(self._get, GetState.Request()), (self._available, GetAvailableTransitions.Request())]
            if changes:
                probes.append((self._change, ChangeState.Request(transition=Transition(label="vg_ros_probe"))))
            for client, request in probes:
                self._call(client, request, resend_s=1.0, timeout_s=self.timeout_s)
        except TimeoutError:
            return False
        return True

    def _call(self, client, request, *, resend_s: float | None = None, timeout_s: float | None = None):
        """The reply to `request`. `resend_s`: ask again each `resend_s` without a reply (idempotent
        requests only). A transition loads a model (configure) or waits behind a long sensor callback, so
        the default wait is generous."""
        import time
        deadline = time.monotonic() + (timeout_s or max(self.timeout_s, 120.0))
        while True:
            future = client.call_async(request)
            wait_s = deadline - time.monotonic() if resend_s is None else min(resend_s, deadline - time.monotonic())
            self.executor.spin_until_future_complete(future, timeout_sec=max(wait_s, 0.0))
            if future.done():
                return future.result()
            client.remove_pending_request(future)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} did not answer {client.srv_name}")

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState
        return self._call(self._get, GetState.Request(), resend_s=2.0).current_state.label

    def available(self) -> list[str]:
        from lifecycle_msgs.srv import GetAvailableTransitions
        reply = self._call(self._available, GetAvailableTransitions.Request(), resend_s=2.0)
        return [t.transition.label for t in reply.available_transitions]

    def change(self, transition: str | int) -> bool:
        """Ask for a transition by label ('configure') or by id (`lifecycle_msgs.msg.Transition`'s numbers,
        as Nav2's lifecycle_manager sends them); True when it succeeded."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState
        asked = Transition(id=transition) if isinstance(transition, int) else Transition(label=transition)
        return bool(self._call(self._change, ChangeState.Request(transition=asked)).success)


def transition_line(client: LifecycleClient, label: str) -> tuple[bool, str]:
    """Run one transition; (succeeded, the line saying what happened)."""
    before = client.state()
    offered = client.available()
    if label not in offered:
        return False, (f"{client.target}: {label} is not a transition from {before} "
                       f"(available: {', '.join(offered) or 'none'})")
    if client.change(label):
        after = client.state() if label != "shutdown" else "finalized"
        return True, f"{client.target}: {label}: {before} -> {after}"
    return False, (f"{client.target}: {label} failed, still {client.state()} "
                   "(the node's log has the reason)")


def run(action: str, targets: list[str], timeout_s: float, out=print) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from vg_ros import ros_compat
    from vg_ros.cli import UserError
    ros_compat.use_dds_profiles()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(f"vg_ros_lifecycle_{os.getpid()}", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    failed = False
    try:
        for target in targets:
            client = LifecycleClient(node, executor, target, timeout_s)
            if not client.wait(changes=action != "get"):   # `get` leaves the node's log alone
                raise UserError(f"no lifecycle node {target} answered within {timeout_s:g} s (is it running, on "
                                f"ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')}, in that namespace?)")
            if action == "get":
                out(f"{target}: {client.state()}")
                continue
            steps = [action]
            if action == "startup":   # as Nav2's lifecycle_manager: configure what is not yet, then activate
                state = client.state()
                steps = {"unconfigured": ["configure", "activate"], "inactive": ["activate"]}.get(state, [])
                if not steps:
                    out(f"{target}: already {state}" if state == "active" else
                        f"{target}: cannot start up from {state}")
                    failed |= state != "active"
            for step in steps:
                ok, line = transition_line(client, step)
                out(line)
                if not ok:
                    failed = True
                    break
    except TimeoutError as exc:   # the node went away or hangs in a transition
        raise UserError(f"{exc} within {max(timeout_s, 120.0):g} s") from None
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from vg_ros import ros_compat
    from vg_ros.cli import UserError

    parser = argparse.ArgumentParser(prog="vg-ros lifecycle", description=(
        "Get or change the lifecycle state of running vg_ros nodes (ros2 lifecycle get/set, without a ROS "
        "install). startup = configure if needed, then activate."))
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="node names (registration_node, /robot1/grounding_node)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each node's services to appear (default 10)")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout}: must be > 0")
    try:
        targets = [node_path(n) for n in args.nodes]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        ros_compat.require_rclpy("vg-ros lifecycle")
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    return run(args.action, targets, args.timeout)
