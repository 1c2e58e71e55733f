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
