"""The floor: a one-leg streaming pass-through on the router's own serving stack.

Quart + Hypercorn + uvloop (`di_router.serving`, as the router runs), one upstream POST per
request on a pooled aiohttp client (the pool under the router's httpx transport), and the bytes
relayed as they arrive, unparsed. A DI request does all of this plus a second leg and the merge,
so this is as fast as the router can be on this stack.

    python benchmarks/passthrough_floor.py --port 8300 --upstream http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from quart import Quart, Response, request

from di_router import serving


def make_app(upstream: str) -> Quart:
    app = Quart(__name__)
    sessions: list[aiohttp.ClientSession] = []  # bound to the serving loop, so made at startup

    @app.before_serving
    async def open_pool() -> None:
        connector = aiohttp.TCPConnector(limit=0)  # no cap: the load decides the pool's size
        sessions.append(aiohttp.ClientSession(connector=connector))

    @app.after_serving
    async def close_pool() -> None:
        await sessions[0].close()

    @app.get("/health")
    async def health() -> str:
        return ""

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def relay() -> Response:
        upstream_response = await sessions[0].post(
            upstream + request.path,
            data=await request.get_data(),
            headers={"Content-Type": "application/json"},
        )

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream_response.content.iter_any():
                    yield chunk
            finally:
                upstream_response.release()

        content_type = upstream_response.headers.get("Content-Type", "application/json")
        return Response(body(), status=upstream_response.status, content_type=content_type)

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL of the one backend")
    args = p.parse_args(argv)
    serving.run(make_app(args.upstream.rstrip("/")), serving.hypercorn_config(args.host, args.port))


if __name__ == "__main__":
    main()
