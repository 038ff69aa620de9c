"""A standalone history query service (tests, benchmarks, a deployment without the
experiments/API service): `python -m services.history.app [--port N]`.

The same routes mount on any aiohttp application with `routes.add_routes`.
"""
from __future__ import annotations

import argparse

from aiohttp import web

from services.history.routes import add_routes
from services.settings import Settings


def make_app(settings: Settings) -> web.Application:
    app = web.Application()
    add_routes(app, settings)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="history query routes on their own")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8084)  # 8083: Kafka Connect
    args = parser.parse_args()
    settings = Settings.from_env()
    print(f"[history] listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(make_app(settings), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
