"""Only an approved Flower App Bundle runs at this site.

The site's SuperNode runs with ``--isolation process``: it starts no ClientApp
itself, it only queues tasks on its loopback Runtime API. :class:`TaskGate`
(a thread of the site daemon) takes each ClientApp task from there and starts
this file as a runner process for it. The runner pulls the task's input (message,
context, run and FAB) with Flower's own ``pull_task_input``, computes the sha256
of the FAB's bytes (Flower's FAB hash) and compares it with ``approved-fabs``:

- approved: Flower's own ``run_clientapp`` goes on unchanged (installs the FAB,
  loads and calls its ClientApp, pushes the reply);
- not approved: the FAB is neither installed nor imported; the runner replies
  with an ``INVALID_FAB`` error (the server sees the site refuse), marks the task
  failed, logs one line with the hash and appends it to ``refused-fabs.jsonl`` in
  the state dir (the daemon's ``/health`` lists them).

The hash is taken of the bytes the ClientApp would be installed from, not of the
hash the SuperLink names: Flower's SuperNode does not check that the two agree.
The runner is started by path with ``python -P``, so no package of the app (which
the FAB carries too) is imported before Flower loads the approved FAB's own;
that is also why this module imports only the standard library and ``flwr``.
The Runtime API is plain HTTP on 127.0.0.1, as with Flower's own SuperExec.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REFUSALS_FILE = "refused-fabs.jsonl"
REFUSED_EXIT = 3  # the runner's exit code for a refused FAB


def read_refusals(state_dir: Path) -> list[dict[str, Any]]:
    """The refused FABs recorded under ``state_dir`` (oldest first; a torn last line is skipped)."""
    path = Path(state_dir) / REFUSALS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def record_refusal(state_dir: Path, entry: dict[str, Any]) -> None:
    """Append one refusal, durably (the line is what ``/health`` reports after a restart too)."""
    with open(Path(state_dir) / REFUSALS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def runtime_client(address: str, component: str) -> Any:
    """Flower's client of the SuperNode's loopback Runtime API (as its SuperExec builds it)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component)], retry_invoker=make_simple_http_retry_invoker())


class TaskGate:
    """Takes the SuperNode's ClientApp tasks and starts a checking runner for each."""

    def __init__(self, runtime_address: str, approved: tuple[str, ...], state_dir: Path, site: str, env: dict[str, str], poll: float = 1.0):
        self.address, self.approved, self.state_dir, self.site = runtime_address, tuple(approved), Path(state_dir), site
        self.env, self.poll = env, poll
        self.runners: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = runtime_client(self.address, "SuperExec")
        while not self._stop.is_set():
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode is (re)starting; it keeps its tasks
                print(f"fedsite client: Runtime API not reachable ({exc.__class__.__name__}); retrying", flush=True)
                self._stop.wait(max(self.poll, 2.0))
                continue
            if res.HasField("task") and res.token:
                self.launch(res.token, int(res.task.run_id))
            self.runners = [p for p in self.runners if p.poll() is None]
            self._stop.wait(self.poll)
        client.close()

    def launch(self, token: str, run_id: int) -> None:
        """One runner process per task; the token goes on stdin (not in the process list)."""
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--runtime-api-address", self.address,
               "--state-dir", str(self.state_dir), "--site", self.site, "--parent-pid", str(os.getpid()), "--run-id", str(run_id),
               *(a for h in self.approved for a in ("--approved", h))]
        from shared_models.child_process import start_child  # in the daemon only: the runner imports no app package

        proc = start_child(cmd, stdin=subprocess.PIPE, env=self.env)
        assert proc.stdin is not None
        proc.stdin.write(token.encode() + b"\n")
        proc.stdin.close()
        self.runners.append(proc)

    def stop(self) -> None:
        from shared_models.child_process import stop_child

        self._stop.set()
        for proc in self.runners:
            stop_child(proc, 10)


def refuse(flower: Any, client: Any, message: Any, context: Any, args: argparse.Namespace, digest: str, fab_id: str) -> None:
    """Reply an ``INVALID_FAB`` error, fail the task, log and record the refusal; nothing of the FAB runs."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus

    reason = f"site {args.site}: FAB sha256 {digest} is not approved (approved-fabs); it was not installed or run"
    print(f"fedsite client: refused FAB sha256 {digest} of run {message.metadata.run_id} ({fab_id or 'no id'}): "
          f"not in approved-fabs ({len(args.approved)} approved); nothing of it was installed or imported", flush=True)
    record_refusal(Path(args.state_dir), {"sha256": digest, "run_id": int(message.metadata.run_id), "fab_id": fab_id, "at": time.time()})
    try:
        flower.push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
    finally:
        flower.push_task_output(client, None, SubStatus.FAILED, reason)  # the run's context is left as it was


def run_task(args: argparse.Namespace, token: str) -> None:
    """Flower's ``run_clientapp`` with the FAB's hash checked between pulling the input and installing the FAB."""
    import flwr.supernode.runtime.run_clientapp as flower

    pull = flower.pull_task_input

    def pull_approved(client: Any) -> Any:
        message, context, run, fab = pull(client)
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest not in args.approved:
            refuse(flower, client, message, context, args, digest, run.fab_id)
            sys.stdout.flush()
            os._exit(REFUSED_EXIT)  # before Flower installs or loads anything of it
        return message, context, run, fab

    flower.pull_task_input = pull_approved
    flower.run_clientapp(runtime_api_address=args.runtime_api_address, token=token, insecure=True, certificates=None,
                         parent_pid=args.parent_pid, runtime_dependency_install=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="run one ClientApp task if its FAB is approved (started by the site daemon)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--run-id", type=int, help="for the process list only")
    parser.add_argument("--approved", action="append", default=[])
    args = parser.parse_args()
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    run_task(args, sys.stdin.readline().strip())


if __name__ == "__main__":
    main()
