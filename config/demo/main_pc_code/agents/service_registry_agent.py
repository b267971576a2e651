"""Demo agent: a registry that answers HTTP on its port, with a health server of its own
(GET /health -> 200) on its health port.

Written like the fleet's legacy agents: plain Python, no idea it is supervised. Its
ports come from AGENT_PORT and HEALTH_CHECK_PORT, as the old launcher exported them,
else from the defaults in its code (health = port + 1)."""
import http.server
import os
import threading

PORT = int(os.environ.get("AGENT_PORT", "7200"))
HEALTH_PORT = int(os.environ.get("HEALTH_CHECK_PORT", str(PORT + 1)))


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


health = http.server.ThreadingHTTPServer(("127.0.0.1", HEALTH_PORT), Handler)
threading.Thread(target=health.serve_forever, daemon=True).start()
print(f"ServiceRegistry listening on {PORT}, health on {HEALTH_PORT}; NATS_PASSWORD "
      f"{'is set' if os.environ.get('NATS_PASSWORD') else 'is MISSING'}", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
