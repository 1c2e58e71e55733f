"""``fedsite provision``: the PKI and configuration files of a federation.

One command, run once by the central team on a trusted machine:

- a certificate authority (``ca/ca.crt``; its key ``ca/ca.key`` never leaves this
  machine), and a TLS certificate for the server host signed by it (SANs: the
  host plus localhost/127.0.0.1, so the server daemon reaches its own SuperLink);
- one EC P-384 authentication key pair per site, in the OpenSSH format Flower
  1.42 expects (``flower-supernode --auth-supernode-private-key`` reads an
  OpenSSH private key; ``flwr supernode register`` an OpenSSH public key);
- ``server.yaml`` (TLS files, the sites' *public* keys, the federation) and
  ``sites/<site>.yaml`` plus ``sites/<site>/`` (the CA certificate and that
  site's private key only), i.e. each site's bundle names only what it needs.

Private keys are written with mode 0600 (created so, never world-readable in
between). Run again with ``--sites`` naming new sites to add them with the same
CA, or with ``--rotate SITE`` to replace a site's key pair.

Every port of a bundle is laid out from ``--port`` (P, 9092 by default), so a
pilot with every site on one host runs from the bundle unedited: P the public
Fleet port (on ``--listen``, all interfaces by default), P+1 the SuperLink on
127.0.0.1, P+308 the server's metrics, and for the i-th site P+2+i its
SuperNode's runtime port and P+408+i its health endpoint (both 127.0.0.1).
``--site-root`` is where each site keeps ``<site>/data`` and ``<site>/state``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_models.durable import atomic_write, atomic_write_text
from shared_models.protocol import TrainSettings

from .app_bundle import installed_fab_hash

_TRAIN = TrainSettings()

DEFAULT_PORT = 9092
DEFAULT_SITE_ROOT = "/srv/fedsite"
# offsets from the bundle's port (P = 9092: metrics 9400, site i runtime 9094 + i, health 9500 + i)
INTERNAL_OFFSET, RUNTIME_OFFSET, METRICS_OFFSET, HEALTH_OFFSET = 1, 2, 308, 408
MAX_ONE_HOST_SITES = METRICS_OFFSET - RUNTIME_OFFSET  # beyond this, site runtime ports would reach the metrics port
CA_DAYS = 3650
CERT_DAYS = 825


def write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with owner-only permissions from the first byte on (``mkstemp`` is 0600)."""
    atomic_write(path, lambda fh: fh.write(data))


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key atomically, world-readable."""
    atomic_write(path, lambda fh: fh.write(data))
    path.chmod(0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsite"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(common_name: str = "fedsite federation CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Server key and certificate valid for every name/IP in ``hosts``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    names = list(dict.fromkeys(hosts))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_auth_keys() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key) of a new EC P-384 node identity."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def server_yaml(server_host: str, port: int, sites: dict[str, str], listen: str = "0.0.0.0") -> dict[str, Any]:
    """The server's configuration (paths relative to the file)."""
    return {
        "superlink": {
            "host": listen,
            "port": port,
            "internal-port": port + INTERNAL_OFFSET,
            "public-address": f"{server_host}:{port}",
            "certfile": "server/server.crt",
            "keyfile": "server/server.key",
            "ca-certfile": "server/ca.crt",
            "database": "state/superlink.db",
        },
        "sites": sites,
        "work-dir": "work",
        "run-name": "fedsite",
        "stay-up": False,
        "metrics": {"host": "127.0.0.1", "port": port + METRICS_OFFSET},
        "federation": {
            "rounds": 20,
            "strategy": "fedavg",
            "strategy-options": {},
            "policy": "fedbn",
            "policy-overrides": {},
            "model": {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 4, "channels": [8, 16, 32], "norm": "batch"},
            "loss": "dicece",
            "local-epochs": 1,
            "lr": 0.003,
            # the site's local recipe, at the round contract's defaults
            "optimizer": _TRAIN.optimizer,
            "lr-schedule": _TRAIN.schedule,
            "warmup-fraction": _TRAIN.warmup_fraction,
            "persist-optimizer": _TRAIN.persist_optimizer,
            "augment": _TRAIN.augment,
            "batch-size": 8,
            "seed": 0,
            "intensity": "zscore",
            "test-fraction": 0.25,
            "split-seed": 0,
            "device": "cpu",
            "min-sites": len(sites),
            "min-train-sites": max(1, (len(sites) + 1) // 2),
            "wait-seconds": 600.0,
            "round-timeout": 3600.0,
            "straggler-grace": 300.0,
            "eval-every": 1,
        },
    }


def site_yaml(site: str, server_host: str, port: int, index: int = 0, approved_fabs: tuple[str, ...] = (),
              site_root: str = DEFAULT_SITE_ROOT) -> dict[str, Any]:
    """One site's configuration (paths relative to the file); no other site's data.

    ``index`` (the site's place in the bundle) gives each site its own local ports,
    so a pilot of every site on one host runs from the bundle unedited.
    ``approved_fabs``: the FAB hashes the site runs (the one this fedsite version submits).
    """
    return {
        "site-id": site,
        "superlink": f"{server_host}:{port}",
        "root-certificates": f"{site}/ca.crt",
        "auth-private-key": f"{site}/auth.key",
        "data-dir": str(Path(site_root) / site / "data"),
        "state-dir": str(Path(site_root) / site / "state"),
        "device": "cpu",
        "health": {"host": "127.0.0.1", "port": port + HEALTH_OFFSET + index},
        "runtime-port": port + RUNTIME_OFFSET + index,
        "heartbeat-interval": 30,
        "restart-delay": 5.0,
        "approved-fabs": list(approved_fabs),
    }


def provision(out: Path, server_host: str, sites: list[str], port: int = DEFAULT_PORT, extra_hosts: tuple[str, ...] = (),
              rotate: tuple[str, ...] = (), listen: str = "0.0.0.0", site_root: str = DEFAULT_SITE_ROOT) -> dict[str, Path]:
    """Create (or extend) the federation bundle under ``out``; returns the files written.
    ``listen`` and ``port`` apply to a new bundle; an existing one keeps its server.yaml's."""
    written: dict[str, Path] = {}
    ca_key_path, ca_cert_path = out / "ca" / "ca.key", out / "ca" / "ca.crt"
    if ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key, ca_cert = make_ca()
        write_private(ca_key_path, _pem_key(ca_key))
        write_public(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        written["ca"] = ca_cert_path
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    server_dir = out / "server"
    if not (server_dir / "server.crt").exists():
        key, cert = make_server_cert(ca_key, ca_cert, [server_host, *extra_hosts, "localhost", "127.0.0.1"])
        write_private(server_dir / "server.key", _pem_key(key))
        write_public(server_dir / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
        written["server-cert"] = server_dir / "server.crt"
    write_public(server_dir / "ca.crt", ca_pem)

    server_file = out / "server.yaml"
    config = yaml.safe_load(server_file.read_text()) if server_file.exists() else server_yaml(server_host, port, {}, listen)
    known: dict[str, str] = dict(config.get("sites") or {})
    approved: tuple[str, ...] = ()
    for site in dict.fromkeys([*sites, *rotate]):
        if not site or "/" in site or site.startswith("."):
            raise ValueError(f"invalid site name {site!r}")
        site_dir = out / "sites" / site
        if site in known and (site_dir / "auth.key").exists() and site not in rotate:
            continue
        private, public = make_auth_keys()
        write_private(site_dir / "auth.key", private)
        write_public(site_dir / "auth.pub", public)
        write_public(site_dir / "ca.crt", ca_pem)
        write_public(server_dir / "site-keys" / f"{site}.pub", public)
        known[site] = f"server/site-keys/{site}.pub"
        site_file = out / "sites" / f"{site}.yaml"
        if not site_file.exists():
            index = list(dict.fromkeys([*known, site])).index(site)
            if index >= MAX_ONE_HOST_SITES:
                raise ValueError(f"site {site}: at most {MAX_ONE_HOST_SITES} sites get distinct local ports in one bundle")
            approved = approved or (installed_fab_hash(),)
            site_cfg = site_yaml(site, server_host, int(config["superlink"]["port"]), index, approved, site_root)
            atomic_write_text(site_file, yaml.safe_dump(site_cfg, sort_keys=False))
        written[site] = site_file
    config["sites"] = known
    if "federation" in config and not server_file.exists():
        config["federation"]["min-sites"] = len(known)
        config["federation"]["min-train-sites"] = max(1, (len(known) + 1) // 2)
    atomic_write_text(server_file, yaml.safe_dump(config, sort_keys=False))
    written["server"] = server_file
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-host", required=True, help="DNS name or IP the sites use to reach the server")
    parser.add_argument("--sites", required=True, help="comma-separated site ids (new ones are added to an existing bundle)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder (CA, certificates, keys, YAMLs)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"SuperLink port (default {DEFAULT_PORT})")
    parser.add_argument("--listen", default="0.0.0.0",
                        help="address the public Fleet port binds (default all interfaces; 127.0.0.1 for a one-host pilot)")
    parser.add_argument("--site-root", default=DEFAULT_SITE_ROOT,
                        help=f"folder holding each site's <site>/data and <site>/state (default {DEFAULT_SITE_ROOT})")
    parser.add_argument("--san", action="append", default=[], help="extra host name/IP for the server certificate (repeatable)")
    parser.add_argument("--rotate", default="", help="comma-separated sites whose key pair is replaced")


def run(args: argparse.Namespace) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    rotate = tuple(s.strip() for s in args.rotate.split(",") if s.strip())
    try:
        site_root = str(Path(args.site_root).expanduser().resolve())
        written = provision(args.out, args.server_host, sites, args.port, tuple(args.san), rotate, args.listen, site_root)
    except (ValueError, OSError) as exc:
        print(f"fedsite provision: {exc}", file=sys.stderr)
        return 2
    for what, path in written.items():
        print(f"{what:>12}: {path}")
    print(f"copy {args.out}/sites/<site>.yaml and {args.out}/sites/<site>/ to each site; keep {args.out}/ca/ca.key offline")
    return 0
