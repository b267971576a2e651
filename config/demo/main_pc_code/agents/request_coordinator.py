"""Demo agent: needs the registry at start-up (as the real one does) and then serves
TCP on AGENT_PORT. It has no health server although its entry names a health port (like
a third of the fleet): it is ready when its main port accepts, as the old launcher
judged. Started before its dependency, it would crash: the supervisor's start order is
what keeps it up."""
import os
import socket
import urllib.request

PORT = int(os.environ.get("AGENT_PORT", "7210"))
REGISTRY = os.environ["REGISTRY_URL"]

with urllib.request.urlopen(REGISTRY + "/agents", timeout=5) as r:  # fails if not up yet
    print(f"RequestCoordinator: registry answered {r.status}", flush=True)

srv = socket.create_server(("127.0.0.1", PORT))
print(f"RequestCoordinator listening on {PORT}", flush=True)
while True:
    conn, _ = srv.accept()
    conn.close()
