"""Threads that race: started together at a barrier, each running the same body with its index."""

from __future__ import annotations

import threading
from collections.abc import Callable


def race(racers: int, body: Callable[[int], None]) -> list[BaseException]:
    """Run ``body(i)`` for i in range(racers), each in its own thread, all released at once; return
    what they raised (nothing, when all went well)."""
    barrier = threading.Barrier(racers)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            body(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
