"""Fault injection for the Ray tests: ShardWorker subclasses that delay shards or exit mid-shard.

The hooks live here, not in the library: a test swaps ``fps_graph.runtime.ray.ShardWorker`` for ``faulty(...)``
(monkeypatch, or ``install`` in a child process). Ray ships the subclass to its worker processes by value
(``register_pickle_by_value``), so they need not import this tests folder.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import ray.cloudpickle

import fps_graph.runtime.ray as fray

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _ExitAt:
    """Wraps a worker's BatchStats: the process exits hard when batch ``at`` of the shard is about to run."""

    def __init__(self, step: Any, at: int, flag: str):
        self._step, self._at, self._flag, self._calls = step, at, flag, 0

    def __call__(self, batch):
        if self._calls == self._at and os.path.exists(self._flag):
            os.remove(self._flag)           # once: the re-run of this shard goes through
            os._exit(1)
        self._calls += 1
        return self._step(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)


def faulty(delay: dict[int, float] | None = None, delay_each: float = 0.0,
           crash: dict[str, Any] | None = None) -> type:
    """A ShardWorker that sleeps ``delay[shard]`` (else ``delay_each``) s before each shard, and with
    ``crash={"shard": id, "batch": i, "flag": path}`` exits after batch i of that shard while ``flag`` exists."""

    class FaultyWorker(fray.ShardWorker):
        def run(self, shard):
            time.sleep((delay or {}).get(shard.id, delay_each))
            if crash and crash["shard"] == shard.id and os.path.exists(crash["flag"]):
                real = self.step
                self.step = _ExitAt(real, crash["batch"] + 1, crash["flag"])
                try:
                    return super().run(shard)
                finally:
                    self.step = real
            return super().run(shard)

    return FaultyWorker


def install(**kwargs: Any) -> None:
    """Use ``faulty(**kwargs)`` for every Ray run of this process (a child process started by a test)."""
    fray.ShardWorker = faulty(**kwargs)
