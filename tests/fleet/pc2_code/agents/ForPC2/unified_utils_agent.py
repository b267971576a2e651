"""UnifiedUtilsAgent (test-fleet stand-in): maintenance utilities.

Serves its main port and answers GET /health on its health port.
Its ports come from AGENT_PORT and HEALTH_CHECK_PORT, else from the defaults baked in
below, as in the real script.
"""

import os
import sys

# As the real agents do: the repository root on sys.path, found from this file.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from common.standin import run_agent  # noqa: E402

DEFAULT_PORT = 7118  # its code's own default, used when AGENT_PORT is not set

if __name__ == "__main__":
    run_agent("UnifiedUtilsAgent", DEFAULT_PORT, health_server=True)
