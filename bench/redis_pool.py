"""What the Redis connection limit costs a command: `redis_max_connections` on and off.

    python bench/redis_pool.py [--commands 20000] [--rounds 3] [--limit 256]

Against an embedded Valkey, the client `shared.store.connect` gives a gateway or worker
runs `GET` --commands times, one at a time and 50 at once, first with no limit (redis-py's
own pool, which opens a connection whenever every open one is busy) and then with
--limit (`shared.store.WaitingPool`: the same until the limit is reached, where a caller
waits for a connection to come back), the two taking turns for --rounds rounds. It
prints the CPU time this process spent per command (Valkey's own is not counted) and
the wall time. The hot
paths (audio ingest, worker reads and publishes) do not take a connection from the pool
per command (`KeptConnection`), so this is the cost of the commands around a session's
start and end. Bounded: --commands at most 1,000,000, --rounds at most 20.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table
from shared.embedded import EmbeddedValkey
from shared.store import connect

CONCURRENCY = (1, 50)


async def one_run(url: str, limit: int, concurrency: int, commands: int) -> tuple[float, float]:
    """(CPU microseconds per command, wall seconds) for `commands` GETs."""
    client = connect(url, "ss-bench:pool", max_connections=limit)
    try:
        await client.ping()

        async def caller(count: int) -> None:
            for _ in range(count):
                await client.get(b"ss-bench:pool")

        wall0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller(commands // concurrency) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await client.aclose()
    return 1e6 * cpu / commands, wall


async def measure(url: str, args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    for rnd in range(1, args.rounds + 1):
        for limit in (0, args.limit):
            for concurrency in CONCURRENCY:
                cpu_us, wall = await one_run(url, limit, concurrency, args.commands)
                name = "none" if limit == 0 else str(limit)
                rows.append([str(rnd), name, str(concurrency), f"{cpu_us:.1f}", f"{wall:.2f}"])
                print(
                    f"round {rnd}, limit {name}, {concurrency} at once: "
                    f"{cpu_us:.1f} us CPU per command, {wall:.2f} s",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=256)
    args = parser.parse_args()
    if not 1 <= args.commands <= 1_000_000 or not 1 <= args.rounds <= 20 or args.limit < 1:
        parser.error("need 1 <= --commands <= 1,000,000, 1 <= --rounds <= 20, --limit >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedValkey(Path(tmp))
        valkey.start()
        try:
            rows = asyncio.run(measure(valkey.url, args))
        finally:
            valkey.stop()
    print()
    print(table(["round", "limit", "at once", "CPU us per command", "wall s"], rows))


if __name__ == "__main__":
    main()
