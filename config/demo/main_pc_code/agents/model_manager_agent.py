"""Demo agent: serves TCP on AGENT_PORT and crashes now and then (every 8-25 s), the way
a leaky legacy agent does. Watch its RESTARTS column grow while nothing else moves."""
import os
import random
import socket
import sys
import threading

PORT = int(os.environ.get("AGENT_PORT", "7220"))
lifetime = random.uniform(8, 25)


def crash():
    print(f"ModelManagerAgent: simulated crash after {lifetime:.0f} s", flush=True)
    os._exit(1)


threading.Timer(lifetime, crash).start()
srv = socket.create_server(("127.0.0.1", PORT))
print(f"ModelManagerAgent listening on {PORT}", flush=True)
while True:
    conn, _ = srv.accept()
    conn.close()
    sys.stdout.flush()
