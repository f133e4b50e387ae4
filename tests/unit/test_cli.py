"""`steer serve`'s CPU defaults for several workers (data, tensor, pipeline parallelism)."""

import os

import pytest

from steering.engine.args import cpu_thread_binding


@pytest.mark.parametrize("cores,workers,expected", [
    ([0, 1], 2, "0|1"),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, "0,1,2,3|4,5,6,7"),
    ([2, 3, 5, 7], 4, "2|3|5|7"),
    ([0, 1, 2, 3, 4], 2, "0,1|2,3"),  # an odd core out stays free for the API process
])
def test_cores_split_evenly_among_workers(monkeypatch, cores, workers, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores))
    assert cpu_thread_binding(workers) == expected


def test_more_workers_than_cores_is_refused(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(ValueError, match="3 CPU workers need at least 3 cores"):
        cpu_thread_binding(3)  # `steer serve` exits with this message (`server.cli.main`)
