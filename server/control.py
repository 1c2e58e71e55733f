"""The SuperLink's Control API client (the code behind the ``flwr`` CLI, flwr 1.42) and the waits built on it."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .server_config import DaemonError, say
from .superlink import SuperLink

CONNECTION = "fedsite"


class Control:
    """The SuperLink's Control API (what the ``flwr`` CLI calls), in-process."""

    def __init__(self, address: str, root_certificates: Path):
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        conn = SuperLinkConnection(name=CONNECTION, address=address, root_certificates=str(root_certificates))
        self.client = init_http_client_from_connection(conn)

    def close(self) -> None:
        self.client.close()

    def runs(self, run_id: int | None = None) -> dict[int, Any]:
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self.client.ListRuns(ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest())
        return {int(k): run_from_proto(v) for k, v in res.run_dict.items()}

    def nodes(self) -> list[Any]:
        from flwr.proto.control_pb2 import ListNodesRequest

        return list(self.client.ListNodes(ListNodesRequest()).nodes_info)

    def register(self, public_key_file: Path, name: str) -> int:
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.proto.control_pb2 import RegisterNodeRequest

        return int(self.client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(public_key_file), name=name)).node_id)

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self.client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def stop(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self.client.StopRun(StopRunRequest(run_id=run_id))

    def start(self, fab_bytes: bytes, run_config: dict[str, Any]) -> int:
        """Submit a FAB with the run's config as its override (what ``flwr run --run-config`` sends)."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        res = self.client.StartRun(StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(run_config),
                                                   federation="", app_spec=""))
        if not res.HasField("run_id"):
            raise DaemonError("the SuperLink did not start the run")
        return int(res.run_id)


def wait_until_up(link: SuperLink, timeout: float = 90.0) -> Control:
    """A Control API client once the SuperLink answers (bounded)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not link.alive():
            raise DaemonError(f"flower-superlink exited with code {link.proc.returncode}; see {link.log_path}")
        host, port = link.address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            control = Control(link.address, link.ca)
            control.runs()
            return control
        except Exception as exc:  # not listening yet
            last = exc
            time.sleep(0.5)
    raise DaemonError(f"the SuperLink did not answer within {timeout:.0f} s ({last})")


def poll_nodes(control: Control, state: dict[str, Any]) -> None:
    try:
        state["nodes"] = {n.name or str(n.node_id): n.status for n in control.nodes()}
    except Exception:  # metrics only
        pass


def wait_for_run(control: Control, link: SuperLink, run_id: int, state: dict[str, Any], poll: float = 2.0) -> Any:
    """The run's final status; fails if the SuperLink dies meanwhile."""
    while True:
        if not link.alive():
            raise DaemonError(f"the SuperLink exited with code {link.proc.returncode} during run {run_id}; see {link.log_path}")
        try:
            status = control.runs(run_id)[run_id].status
        except Exception as exc:
            say(f"run status unavailable ({exc.__class__.__name__}); retrying")
            time.sleep(poll)
            continue
        if status.status == "finished":
            return status
        poll_nodes(control, state)
        time.sleep(poll)


def follow_run_log(link: SuperLink, run_id: int) -> None:
    """Echo the round loop's own log lines (the ServerApp's output goes to the
    SuperLink's run log, what ``flwr log RUN_ID`` shows), on a daemon thread."""

    def follow() -> None:
        from flwr.proto.control_pb2 import StreamLogsRequest

        try:
            control = Control(link.address, link.ca)
            for res in control.client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                for line in res.log_output.splitlines():
                    if " fedsite." in line:
                        print(line, flush=True)
        except Exception:  # the log is a convenience; the run status decides
            pass

    threading.Thread(target=follow, name="fedsite-run-log", daemon=True).start()
