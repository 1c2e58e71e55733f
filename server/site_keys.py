"""The provisioned sites' public keys, kept in step with the SuperLink's registry of SuperNodes."""

from __future__ import annotations

from pathlib import Path

from .control import Control
from .server_config import say


def public_pem(public_key_file: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sync_sites(control: Control, sites: dict[str, Path]) -> dict[str, int]:
    """Register every provisioned key; unregister a rotated-out key and the keys of sites
    removed from server.yaml (only nodes this daemon named; manual registrations stay)."""
    def text(key: bytes | str) -> str:
        return (key.decode() if isinstance(key, bytes) else key).strip()

    registered = {text(n.public_key): n for n in control.nodes() if n.status != "unregistered"}
    ids = {}
    for site, key_file in sites.items():
        pem = public_pem(key_file).strip()
        if pem in registered:
            ids[site] = int(registered[pem].node_id)
            continue
        for node in list(registered.values()):
            if node.name == site:
                say(f"site {site}: key changed, unregistering its old key (node {node.node_id})")
                control.unregister(int(node.node_id))
        ids[site] = control.register(key_file, site)
        say(f"site {site}: key registered (node {ids[site]})")
    for node in registered.values():
        if node.name and node.name not in sites and int(node.node_id) not in ids.values():
            say(f"site {node.name}: no longer in server.yaml, unregistering its key (node {node.node_id})")
            control.unregister(int(node.node_id))
    return ids
