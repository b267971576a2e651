"""MemoryDecayManager (test-fleet stand-in): ages memories; serves no port.

Serves no port at all: a background worker that just stays alive.
Its ports come from AGENT_PORT and HEALTH_CHECK_PORT, else from the defaults baked in
below, as in the real script.
"""

import os
import sys

# As the real agents do: the repository root on sys.path, found from this file.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from common.standin import run_agent  # noqa: E402

DEFAULT_PORT = None  # it serves no main port

if __name__ == "__main__":
    run_agent("MemoryDecayManager", DEFAULT_PORT, health_server=False)
