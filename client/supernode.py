"""Flower's SuperNode with a configurable heartbeat interval (started by ``fedsite client``).

flwr 1.42 hard-codes the SuperNode heartbeat at 30 s (``HEARTBEAT_DEFAULT_INTERVAL``;
the SuperLink accepts 10..1800 s and declares a node dead after 2 missed
intervals). A site daemon may want a shorter interval so that a crashed site is
noticed sooner (tests use 10 s). This wrapper sets the module constants the
SuperNode reads, then runs the unchanged ``flower-supernode`` entry point with
the arguments it was given, and exits when its parent (the site daemon) dies.

Usage: ``FEDSITE_HEARTBEAT_INTERVAL=10 python -m client.supernode <flower-supernode args>``
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    interval = float(os.environ.get("FEDSITE_HEARTBEAT_INTERVAL", "30"))
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supernode.cli import flower_supernode

    connection.HEARTBEAT_DEFAULT_INTERVAL = interval  # announced to the SuperLink
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval  # how often the sender beats
    if os.environ.get("FEDSITE_PARENT_PID"):
        start_parent_process_monitor(int(os.environ["FEDSITE_PARENT_PID"]))
    sys.argv = ["flower-supernode", *sys.argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
