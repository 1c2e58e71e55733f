"""Independent cells of a matrix at the same time, each federation in a process of its own.

A cell is a whole federation with its own seed, split, site state and output
folder, so cells do not share anything but the machine. With ``parallel-cells``
N > 1, N worker processes (spawned, each with a Ray instance of its own holding
its share of the cores) take the cells in matrix order; each finished record is
the one a sequential run writes, and the results keep the matrix order, so
``results.json`` is the same whatever N (timings aside).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interrupt
from .experiment import Cell, DataConfig, ExperimentConfig

WORKER_STOP_S = 15.0  # a stopped matrix gives each worker this long to shut its Ray down


class CellFailed(RuntimeError):
    """A cell's federation raised; ``index`` is the job's position."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(str(cause))
        self.index = index


@dataclass(frozen=True)
class CellJob:
    """One cell and what running it needs (picklable: it crosses into a worker process)."""

    cfg: ExperimentConfig
    data: DataConfig
    cell: Cell
    root: Path
    sites: tuple[str, ...]
    out: Path
    verbose: bool


def auto_parallel(cfg: ExperimentConfig, train_sites: int, cells: int) -> int:
    """``parallel-cells: 0``: as many federations as the cores hold at one core share per site, at least 1."""
    if cfg.ray_address:
        return 1  # a cluster's size is not this machine's
    need = max(train_sites + 1, 1) * max(cfg.client_resources.num_cpus, 1e-3)  # +1: a pooled arm's extra node
    return max(1, min(cells, int((os.cpu_count() or 1) // need)))


def ray_cpus_per_worker(parallel: int) -> int:
    """The cores each worker's own Ray instance may hand to its sites."""
    return max(1, (os.cpu_count() or 1) // parallel)


def run_job(job: CellJob, ray_cpus: int | None = None) -> tuple[dict[str, Any], bool]:
    """Run one cell (or reuse its finished record): ``(record, reused)``."""
    from .run import run_cell

    return run_cell(job.cfg, job.data, job.cell, job.root, list(job.sites), job.out, job.verbose, ray_cpus=ray_cpus)


def _worker_init(hint: str) -> None:
    interrupt.install(hint)  # SIGTERM from the parent: shut this worker's Ray down and exit


def run_jobs(jobs: list[CellJob], parallel: int, hint: str, on_start: Callable[[int], None],
             on_done: Callable[[int, dict[str, Any], bool], None]) -> list[dict[str, Any]]:
    """Every job's record in job order; ``parallel`` > 1 runs them in that many worker processes.

    A cell that fails raises :class:`CellFailed` (the other workers stopped first).
    ``on_start`` is called as a cell starts (in parallel: as it is queued), ``on_done`` in job order.
    """
    if parallel <= 1 or len(jobs) <= 1:
        records = []
        for i, job in enumerate(jobs):
            on_start(i)
            try:
                record, reused = run_job(job)
            except Exception as exc:  # the engine re-raises the ServerApp's exception
                raise CellFailed(i, exc) from exc
            on_done(i, record, reused)
            records.append(record)
        return records
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: Ray and torch start clean
    pool = ctx.Pool(processes=parallel, initializer=_worker_init, initargs=(hint,))
    stop_pool = _stopper(pool)
    interrupt.on_stop(stop_pool)
    try:
        pending, ray_cpus = [], ray_cpus_per_worker(parallel)
        for i, job in enumerate(jobs):
            on_start(i)
            pending.append(pool.apply_async(run_job, (job, ray_cpus)))
        records = []
        for i, result in enumerate(pending):
            try:
                record, reused = result.get()
            except Exception as exc:
                raise CellFailed(i, exc) from exc
            on_done(i, record, reused)
            records.append(record)
        pool.close()
        pool.join()
        return records
    except BaseException:
        stop_pool()
        raise
    finally:
        interrupt.remove_on_stop(stop_pool)


def _stopper(pool: Any) -> Callable[[], None]:
    def stop() -> None:
        """SIGTERM each worker (its handler stops its Ray), then wait a bounded time for all of them."""
        pool.terminate()
        workers = list(getattr(pool, "_pool", []))
        for w in workers:
            w.join(WORKER_STOP_S)
        print(f"fedsite simulate: stopped {len(workers)} cell worker(s)", file=sys.stderr, flush=True)

    return stop

