"""`edgeharvest serve` on uvicorn's own httptools protocol, which writes a response's head and
body in two system calls, instead of the service's `service/http_protocol.py`.

    .venv/bin/python -m bench.uvicorn_protocol_serve --host 127.0.0.1 --port 8001

The contender `bench/side_by_side.py --compare protocol` measures the service against.
"""

from __future__ import annotations

import sys

from service import cli

if __name__ == "__main__":
    cli.UVICORN_OPTIONS["http"] = "httptools"
    cli.app(["serve", *sys.argv[1:]])
