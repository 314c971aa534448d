"""Small timing helpers shared by the benchmark scripts (medians after warm-up, percentiles)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_ms(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"p50": statistics.median(samples), "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "min": samples[0]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


async def load_raw(url: str, bodies: list[bytes] | None, concurrency: int, requests: int) -> tuple[float, list[float], int]:
    """POST ``bodies`` (in turn) to ``url`` from ``concurrency`` clients, ``requests`` in all; ``bodies`` None:
    GET ``url``. One keep-alive HTTP/1.1 connection per client over plain asyncio streams, prebuilt request
    bytes, responses read by Content-Length or chunks: tens of microseconds of client CPU per request (httpx
    takes several hundred), so the client is not the limit when it shares the host with the server.
    Returns (seconds, latencies in ms, non-200 count)."""
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if bodies is None:
        wire = [f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()]
    else:
        head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                "Content-Length: {}\r\n\r\n")
        wire = [head.format(len(b)).encode() + b for b in bodies]
    latencies, failures, queue = [], 0, list(range(requests))

    async def read_response(reader) -> tuple[bytes, bool]:
        status_line = await reader.readline()
        length, close, chunked = 0, not status_line, False
        while status_line and (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if chunked:
            while (size := int((await reader.readline()).strip(), 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readline()
        elif status_line:
            await reader.readexactly(length)
        return status_line, close

    async def worker():
        nonlocal failures
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while queue:
                i = queue.pop()
                start = time.perf_counter()
                writer.write(wire[i % len(wire)])
                status_line, close = await read_response(reader)
                latencies.append((time.perf_counter() - start) * 1000)
                failures += status_line.split(b" ", 2)[1:2] != [b"200"]
                if close:  # the server (or a proxy that reloads) ended the connection: open another
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, failures
