"""`switchboard up` with a stand-in engine, run as its own process (`python -m tests.support.quickstart`).

The bundled engine times dtype and quantization on its first start (minutes on a small machine), which is
too slow for tests of how `up` starts and stops it. This runs the same `run_quickstart` with
`start_engine` starting a small HTTP server in a child process instead: `/health` answers 200 (or 503 with
`--engine-never-ready`), like the engine's. Everything else (migrations, demo key, the gateway, signal
handling) is the real command's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

STAND_IN = """
import http.server, sys
ready = sys.argv[2] == "ready"
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if ready else 503)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def main() -> int:
    from gateway.cli.common import load_for_serving
    from gateway.cli.up import run_quickstart

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--engine-port", type=int, required=True)
    parser.add_argument("--engine-never-ready", action="store_true")
    args = parser.parse_args()
    state = "never" if args.engine_never_ready else "ready"

    def start_stand_in(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", STAND_IN, str(port), state])

    config = load_for_serving(args.config)
    return run_quickstart(config, engine_port=args.engine_port, with_engine=True, start_engine=start_stand_in)


if __name__ == "__main__":
    sys.exit(main())
