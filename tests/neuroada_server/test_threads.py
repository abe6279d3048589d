"""Threads beside the worker start no OpenMP team; start-up work runs on a thread that ends."""

from __future__ import annotations

import asyncio
import os
import queue
import threading

import pytest
import torch

from neuroada_server.threads import in_own_thread, serial_torch


def os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def threads_added_by_a_parallel_op(serial: bool) -> tuple[int, int]:
    """(OS threads started while a live thread ran a large parallel op, that thread's torch thread
    count). The thread stays alive while counting: OpenMP keeps a team for its life. Threads that
    others end meanwhile do not count."""
    counted, release = queue.Queue(), threading.Event()

    def run() -> None:
        if serial:
            serial_torch()
        before = os_threads()
        torch.ones(8_000_000).mul_(2).sum()
        counted.put((len(os_threads() - before), torch.get_num_threads()))
        release.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        return counted.get(timeout=60)
    finally:
        release.set()
        thread.join()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here: no team to avoid")
def test_a_serial_thread_starts_no_team_and_leaves_others_parallel():
    threads = torch.get_num_threads()
    added, own = threads_added_by_a_parallel_op(serial=False)
    assert added >= 1 and own == threads  # the control: a plain thread's parallel op starts helpers
    added, own = threads_added_by_a_parallel_op(serial=True)
    assert added == 0 and own == 1
    assert torch.get_num_threads() == threads  # this thread's count is its own


def test_in_own_thread_returns_or_raises_from_a_thread_that_ends():
    seen = []

    def work(x: int) -> int:
        seen.append(threading.current_thread())
        return x + 1

    def fail() -> None:
        raise ValueError("no")

    async def main() -> int:
        with pytest.raises(ValueError, match="no"):
            await in_own_thread(fail)
        return await in_own_thread(work, 41)

    assert asyncio.run(main()) == 42
    seen[0].join(5)
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
