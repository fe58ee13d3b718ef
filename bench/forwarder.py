"""The floor: the thinnest aiohttp reverse proxy (no parsing, no metering, no ledger), on
the event loop meterproxy runs on (uvloop when installed).

`python -m bench.forwarder --port 9200 --upstream http://127.0.0.1:9100`
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, TCPConnector, web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    key = web.AppKey("session", ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[key] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
        yield
        await app[key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with app[key].request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as r:
            out_headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
            if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp = web.StreamResponse(status=r.status, headers=out_headers)
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            return web.Response(status=r.status, body=await r.read(), headers=out_headers)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100")
    args = parser.parse_args()
    try:  # the event loop meterproxy runs on (server.event_loop: auto)
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        backlog=4096,
        loop=loop,
        print=lambda *_: print(f"forwarder on 127.0.0.1:{args.port}", flush=True),
    )


if __name__ == "__main__":
    main()
