"""A fake OpenAI-compatible completion server for the benchmark's tests: GET /health, and
streamed POST /v1/completions that emit max_tokens chunks, one every --token-ms, then usage.
Each request's arrival (wall clock) and `model` field are appended to --journal.

    python -m tests.bench.fake_openai --port P --token-ms 2 --journal FILE
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def handler(token_s: float, journal: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(journal, "a") as f:
                f.write(json.dumps({"t": time.time(), "model": body.get("model")}) + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            n = body["max_tokens"]
            for i in range(n):
                time.sleep(token_s)
                self._event(
                    {
                        "choices": [
                            {"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}
                        ]
                    }
                )
            self._event(
                {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}}
            )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _event(self, data: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-ms", type=float, default=1.0)
    ap.add_argument("--journal", required=True)
    args = ap.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), handler(args.token_ms / 1000, args.journal)).serve_forever()


if __name__ == "__main__":
    main()
