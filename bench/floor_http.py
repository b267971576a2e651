"""The floor of the sidecar's L7 stack: the least an HTTP/1.1 proxy on uvloop and
httptools does per request, measured by bench/hot_path.py as the target `floor-L7`.

It parses both directions (a proxy must know where each request and answer ends) and
forwards every byte as it came, over one upstream connection per agent connection. No
timeout, breaker, retry, metrics, pooling, header rewriting or flow control: none of
what the sidecar is for. So it is not a proxy to use, only a yardstick: what is left
between it and HAProxy is the cost of the stack (Python on uvloop), and what is left
between the sidecar and it is the cost of the sidecar's own work.

Usage: python bench/floor_http.py LISTEN_PORT UPSTREAM_PORT   (both on 127.0.0.1)
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, agent: _Agent):
        self.agent = agent
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.agent.upstream_ready(transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.agent.transport.write(data)

    def on_message_complete(self) -> None:  # an answer ended: nothing to account here
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.transport.close()


class _Agent(asyncio.Protocol):
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        loop.create_task(loop.create_connection(lambda: _Upstream(self), "127.0.0.1",
                                                self.upstream_port))

    def upstream_ready(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        for data in self.pending:
            transport.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def on_message_complete(self) -> None:  # a request ended: nothing to decide here
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def _serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Agent(upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
