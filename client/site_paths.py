"""Who this node is and where its data and durable state live.

The server sends the full recipe with every message (see
:mod:`shared_models.protocol`), so a site daemon needs no copy of the
experiment configuration. Where the *data* and the *state* live is the site's
own business: a deployed SuperNode names them in its ``--node-config``; only a
simulated node (which has a ``partition-id`` instead) takes them from the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_models.protocol import NODE_DATA_DIR, NODE_SITE_ID, NODE_STATE_DIR, POOLED_SITE, SIM_PARTITION_KEY, ProtocolError, RoundConfig


@dataclass(frozen=True)
class SitePaths:
    """Who this node is and where its data and durable state live."""

    site: str
    data_dir: Path  # the site's own folder (images/, labels/); for the pooled node, the multi-site root
    state_dir: Path
    pooled_sites: tuple[str, ...] = ()  # non-empty only for the simulated pooled-training node


def resolve_site(node_config: Mapping[str, Any], cfg: RoundConfig) -> SitePaths:
    """Site identity from ``--node-config`` (deployment) or partition-id (simulation)."""
    if NODE_SITE_ID in node_config:
        site = str(node_config[NODE_SITE_ID])
        missing = [k for k in (NODE_DATA_DIR, NODE_STATE_DIR) if k not in node_config]
        if missing:
            raise ProtocolError(f"site {site}: node config lacks {', '.join(missing)}")
        return SitePaths(site, Path(str(node_config[NODE_DATA_DIR])), Path(str(node_config[NODE_STATE_DIR])))
    if SIM_PARTITION_KEY not in node_config:
        raise ProtocolError(f"node config has neither {NODE_SITE_ID!r} (deployment) nor {SIM_PARTITION_KEY!r} (simulation)")
    pid = int(node_config[SIM_PARTITION_KEY])
    if not cfg.sim_sites or not cfg.sim_data_dir or not cfg.sim_state_dir:
        raise ProtocolError("simulated node: the server did not send sim-sites/sim-data-dir/sim-state-dir")
    root, state_root = Path(cfg.sim_data_dir), Path(cfg.sim_state_dir)
    if pid < len(cfg.sim_sites):
        site = cfg.sim_sites[pid]
        return SitePaths(site, root / site, state_root / site)
    if pid == len(cfg.sim_sites):
        return SitePaths(POOLED_SITE, root, state_root / POOLED_SITE, pooled_sites=cfg.sim_sites)
    raise ProtocolError(f"simulated node with partition-id {pid} but only {len(cfg.sim_sites)} sites (+1 pooled)")
