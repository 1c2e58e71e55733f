"""The Flower ClientApp that runs at every site (and in every simulated site).

One round at a site: build the model from the server's spec, load the global
shared tensors (strict), load the site-local tensors from the durable store
(first round: from the seeded initial model), train, write the local tensors
atomically (and the optimizer's state, to continue it next round), reply with the
shared tensors only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared_models import architecture_fingerprint, build_model, partition
from shared_models.durable import tensors_checksum
from shared_models.losses import make_loss
from shared_models.partition import Split
from shared_models import protocol as P
from shared_models.protocol import EvalMetrics, RoundConfig, SiteInfo, TrainMetrics

from .ditto import load_personal, train_personal
from .fingerprint import site_fingerprint
from .exchange import load_local, load_shared, local_tensors, shared_record
from .global_store import GlobalSnapshot, save_global
from .optim_state import OptimizerStateStore
from .site_metrics import record_training
from .site_paths import SitePaths, resolve_site
from .site_state import DEPLOYED_FILE, SiteStateError, SiteStateStore
from .personalise import finetune, personal_store
from .refresh import has_local_statistics, refresh_statistics
from .schedule import round_position, round_settings
from .site_inputs import SiteInputs, site_inputs
from .trainer import resolve_device, train_batches

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("fedsite.client")

app = ClientApp()


@dataclass
class SiteModel:
    """The model of this round with its split, store and fingerprint."""

    model: torch.nn.Module
    split: Split
    store: SiteStateStore
    fingerprint: str
    loaded_local: dict | None = None  # checksum and round of the site-local tensors loaded from disk


def prepare_model(message: Message, context: Context, evaluating: bool = False) -> tuple[RoundConfig, SitePaths, SiteModel]:
    """Build the round's model and put the global shared + stored local tensors in it.

    Training round r starts from the local state written before round r; evaluating
    round r scores the state round r trained.
    """
    cfg = RoundConfig.from_record(message.content[P.CONFIG])
    paths = resolve_site(context.node_config, cfg)
    if P.NODE_DEVICE in context.node_config:  # a deployed site picks its own accelerator (fedsite client --device)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=str(context.node_config[P.NODE_DEVICE])))
    model = build_model(cfg.model_spec, seed=cfg.train.seed)
    fingerprint = architecture_fingerprint(model)
    if fingerprint != cfg.fingerprint:
        raise ValueError(
            f"site {paths.site}: model fingerprint {fingerprint} differs from the server's {cfg.fingerprint} "
            "(different fedsite version or model code at this site)"
        )
    split = partition(model, cfg.partition_policy)
    received = load_shared(model, message.content[P.ARRAYS], split, paths.site, cfg.transport_dtype)
    # Kept for `fedsite predict`: the newest global shared tensors, next to the local state.
    save_global(paths.state_dir, GlobalSnapshot(cfg.run_name, cfg.server_round, cfg.model_spec, cfg.policy,
                                                cfg.policy_overrides, fingerprint, received, cfg.intensity,
                                                cfg.train.patch_size, cfg.train.target_spacing))
    store = SiteStateStore(paths.state_dir, cfg.run_name, paths.site)
    loaded = None
    if split.local and store.exists():
        tensors, stored_round = store.load(fingerprint=fingerprint, policy=cfg.policy, expected_keys=set(split.local),
                                           before_round=cfg.server_round + (1 if evaluating else 0))
        load_local(model, tensors)
        loaded = {"local_state_checksum": tensors_checksum(tensors), "local_state_round": stored_round}
    return cfg, paths, SiteModel(model, split, store, fingerprint, loaded)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training round; replies with shared tensors and training metrics."""
    called = time.perf_counter()
    cfg, paths, sm = prepare_model(message, context)
    data = site_inputs(paths, cfg)
    if data.num_train == 0:
        raise ValueError(f"site {paths.site}: no training cases")
    torch.set_num_threads(max(1, int(os.environ.get("FEDSITE_THREADS", "1"))))
    global_shared = {k: v.clone() for k, v in sm.model.state_dict().items() if k in set(sm.split.shared)}
    settings = round_settings(cfg)
    loss_fn = make_loss(cfg.loss, sm.model, seed=settings.seed)
    optim_store = OptimizerStateStore(paths.state_dir, cfg.run_name, paths.site)
    stored = optim_store.load(fingerprint=sm.fingerprint, optimizer=settings.optimizer,
                              before_round=cfg.server_round) if settings.persist_optimizer else None
    personal = copy.deepcopy(sm.model) if cfg.personal_mu > 0 else None  # Ditto: starts from the round's model
    report = train_batches(sm.model, data.batches(settings), settings, loss_fn, global_shared,
                           position=round_position(cfg), optimizer_state=stored)
    if settings.persist_optimizer:  # kept at the site: the reply below carries the shared tensors only
        optim_store.save(report.optimizer_state, fingerprint=sm.fingerprint, optimizer=settings.optimizer, round_=cfg.server_round)
    if sm.split.local:
        sm.store.save(local_tensors(sm.model, sm.split), fingerprint=sm.fingerprint, policy=cfg.policy, round_=cfg.server_round)
    if personal is not None:
        train_personal(personal, global_shared, data.batches, cfg, paths, sm.fingerprint)
    log.info("site %s round %d: loss %.4f, %d samples in %.1fs", paths.site, cfg.server_round, report.loss, report.samples, report.seconds)
    record_training(paths.state_dir, paths.site, {
        "round": cfg.server_round, "run": cfg.run_name, "loss": report.loss, "samples": report.samples,
        "train_seconds": report.seconds, "images_per_second": report.samples / max(report.seconds, 1e-9),
        "gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        **(sm.loaded_local or {"local_state_checksum": None, "local_state_round": None}),
    })
    arrays = shared_record(sm.model, sm.split, paths.site, cfg.transport_dtype)
    metrics = TrainMetrics(data.num_train, report.loss, report.seconds, report.samples / max(report.seconds, 1e-9),
                           time.perf_counter() - called)
    content = RecordDict(
        {
            P.ARRAYS: arrays,
            P.METRICS: MetricRecord(metrics.to_record()),
            P.CONFIG: ConfigRecord({P.SITE_ID: paths.site, P.FINGERPRINT: sm.fingerprint}),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the site's personalised model (global shared + own local) on its test split."""
    cfg, paths, sm = prepare_model(message, context, evaluating=True)
    if sm.split.local and not sm.store.exists():
        raise SiteStateError(
            f"site {paths.site}: no site-local state for run {cfg.run_name!r} under policy {cfg.policy.name}; "
            "this site never trained in this federation -- build its normalization with an adaptation step first"
        )
    data = site_inputs(paths, cfg)
    started = time.perf_counter()
    deploy_site_model(sm, cfg, paths, data)
    result = data.evaluate(sm.model, cfg)
    metrics = EvalMetrics(result.n, result.dice, result.per_class, result.hd95, result.hd95_per_class, time.perf_counter() - started,
                          result.per_case)
    content = RecordDict({P.METRICS: MetricRecord(metrics.to_record()), P.CONFIG: ConfigRecord({P.SITE_ID: paths.site})})
    return Message(content=content, reply_to=message)


def deploy_site_model(sm: SiteModel, cfg: RoundConfig, paths: SitePaths, data: SiteInputs) -> None:
    """Make the model this evaluation scores, and store it as the site would deploy it (`fedsite predict`)."""
    if cfg.personal_mu > 0:  # Ditto scores the site's personal model, with its own statistics refreshed
        load_personal(sm.model, cfg, paths, sm.fingerprint)
        if cfg.eval_statistics == "refresh" and data.num_train:
            refresh_statistics(sm.model, data.statistics_images(cfg.train.seed), partition(sm.model, "local"),
                               cfg.train.batch_size, resolve_device(cfg.train.device))
        return
    finetuned = cfg.finetune_epochs > 0 and data.num_train > 0
    if finetuned:
        stored = None
        if cfg.train.persist_optimizer:
            stored = OptimizerStateStore(paths.state_dir, cfg.run_name, paths.site).load(
                fingerprint=sm.fingerprint, optimizer=cfg.train.optimizer, before_round=cfg.server_round + 1)
        finetune(sm.model, data.batches, cfg, stored)
    if cfg.eval_statistics == "refresh" and has_local_statistics(sm.split) and data.num_train:
        images = data.statistics_images(cfg.train.seed)
        refresh_statistics(sm.model, images, sm.split, cfg.train.batch_size, resolve_device(cfg.train.device))
        if not finetuned:
            SiteStateStore(paths.state_dir, cfg.run_name, paths.site, DEPLOYED_FILE).save(
                local_tensors(sm.model, sm.split), fingerprint=sm.fingerprint, policy=cfg.policy, round_=cfg.server_round)
    if finetuned:
        personal_store(paths.state_dir, cfg.run_name, paths.site).save(
            sm.model.state_dict(), fingerprint=sm.fingerprint, policy=cfg.policy, round_=cfg.server_round)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Who is this node? (site id and dataset sizes; asked for, the data's fingerprint; never any tensor)."""
    cfg = RoundConfig.from_record(message.content[P.CONFIG])
    paths = resolve_site(context.node_config, cfg)
    data = site_inputs(paths, cfg)
    info = SiteInfo(paths.site, data.num_train, data.num_test, data.num_rejected)
    content = RecordDict({P.CONFIG: ConfigRecord(info.to_record())})
    if cfg.with_fingerprint and not paths.pooled_sites:
        fingerprint = site_fingerprint(paths.data_dir, test_fraction=cfg.test_fraction, site_id=paths.site)
        content[P.FINGERPRINT_RECORD] = ConfigRecord(fingerprint.to_record())
    return Message(content=content, reply_to=message)
