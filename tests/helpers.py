"""Builders shared by tests (Flower reply messages without a running federation)."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message


def make_reply(arrays: dict[str, np.ndarray], num_examples: int, node_id: int = 1, site: str = "site-a"):
    """A train reply as a site's ClientApp would send it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="ins",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "loss": 0.5}),
            "config": ConfigRecord({"site-id": site}),
        }
    )
    return make_message(metadata=metadata, content=content)


def set_task_identity() -> None:
    """Flower needs a task identity to create messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


def write_federation_json(cell_dir, run_name: str, policy: str, spec: dict, sites: list, seed: int = 0, overrides: dict | None = None) -> None:
    """The federation.json a finished ServerApp writes (what reports rebuild models from)."""
    import json

    from server.run_config import ServerRunConfig
    from shared_models.config import to_dict

    config = ServerRunConfig(model=json.dumps(spec), run_name=run_name, policy=policy, seed=seed, policy_overrides=json.dumps(overrides or {}),
                             out_dir=str(cell_dir), state_dir=str(cell_dir / "site-state"), sites=",".join(sites))
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "federation.json").write_text(json.dumps({"policy": policy, "sites": list(sites), "config": to_dict(config)}))


# A two-site, two-round experiment small enough for end-to-end tests of `fedsite simulate`.
TINY_EXPERIMENT = """
name: tiny
data:
  synthetic: {sites: 2, cases-per-site: 8, spatial-dims: 2, size: [32, 32], num-classes: 3, seed: 0}
model: {name: unet, channels: [4, 8], norm: batch}
methods: [fedbn]
seeds: [0]
rounds: 2
batch-size: 4
device: cpu
"""


class LocalGrid:
    """A Flower Grid whose nodes are the real ClientApp, called in-process on real site folders.

    ``on_reply(site, message_type, server_round, content)`` may alter a reply before the server sees it.
    """

    def __init__(self, sites, data_root, state_root, on_reply=None):
        from flwr.app import Context, RecordDict

        self.nodes = {i + 1: s for i, s in enumerate(sites)}
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"site-id": s, "data-dir": str(data_root / s), "state-dir": str(state_root / s)},
                       state=RecordDict(), run_config={})
            for n, s in self.nodes.items()
        }
        self.on_reply = on_reply
        self.outbox = {}
        self.sent = []  # every message pushed, for tests that inspect what left the server

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from client.app import app as client_app

        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"{msg.metadata.message_type}-{msg.metadata.dst_node_id}-{len(self.outbox)}-{i}"
            msg.metadata.__dict__["_src_node_id"] = 0
            node = msg.metadata.dst_node_id
            self.sent.append(msg)  # before the reply: ``on_reply`` may read what the node was sent (``sent[-1]``)
            reply = client_app(msg, self.contexts[node])
            if self.on_reply is not None:
                self.on_reply(self.nodes[node], msg.metadata.message_type, int(msg.content["config"]["server-round"]), reply.content)
            self.outbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(m) for m in list(message_ids) if m in self.outbox]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def fingerprint(site="site-a", shape=(100, 100), classes=(0, 1, 2, 3), num_train=30, spacing=None):
    """A hand-made SiteFingerprint: every case of ``shape``, ``num_train`` training cases."""
    from shared_models.protocol import IntensityStats, SiteFingerprint

    stats = IntensityStats(100.0, 20.0, 50.0, 100.0, 150.0)
    dims = len(shape)
    return SiteFingerprint(
        site_id=site, num_cases=num_train + 10, num_train=num_train, spatial_dims=dims,
        shape_median=tuple(shape), shape_min=tuple(shape), shape_max=tuple(shape),
        spacing=tuple(spacing or [1.0] * dims), classes=tuple(classes),
        class_fractions=tuple(1.0 / len(classes) for _ in classes), intensity=stats, intensity_foreground=stats,
    )


def toy_segmentation(n=8, size=16, noise=0.1):
    """(images, labels): a square with a smaller square inside, plus seeded Gaussian noise."""
    import torch

    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, 1, size, size, dtype=torch.long)
    labels[:, :, 4:12, 4:12] = 1
    labels[:, :, 6:9, 6:9] = 2
    return labels.float() + noise * torch.randn(n, 1, size, size, generator=g), labels


#: the two-site, 3-class network of the in-process federation tests
TINY_UNET = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}


def two_site_data(root):
    """(site names, data root): 6 cases of 16x16 at each of the first two scanner profiles, task identity set."""
    from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset

    set_task_identity()
    profiles = DEFAULT_PROFILES[:2]
    return [p.name for p in profiles], generate_dataset(root / "data", profiles=profiles, cases_per_site=6, size=(16, 16), num_classes=3)
