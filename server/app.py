"""The Flower ServerApp: the same object on a SuperLink and in simulation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared_models.durable import atomic_write_text
from shared_models.protocol import FEDERATION_FILE

from .rounds import run_federation
from .run_config import ServerRunConfig

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("fedsite.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured federation and write its result next to its checkpoints."""
    cfg = ServerRunConfig.from_run_config(context.run_config)
    result = run_federation(grid, cfg)
    out = Path(cfg.out_dir)
    atomic_write_text(out / FEDERATION_FILE, json.dumps(result.to_json(), indent=2))
    log.info("federation %s finished: mean Dice %.4f (%s)", cfg.run_name, result.mean_dice, out / FEDERATION_FILE)
