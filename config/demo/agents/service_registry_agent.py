"""Demo agent: a registry that answers HTTP on AGENT_PORT (GET /health -> 200).

Written like the fleet's legacy agents: plain Python, no idea it is supervised."""
import http.server
import os

PORT = int(os.environ.get("AGENT_PORT", "17200"))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "ok"}' if self.path == "/health" else b'{"agents": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass  # keep the demo's log files readable


print(f"ServiceRegistry listening on {PORT}", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
