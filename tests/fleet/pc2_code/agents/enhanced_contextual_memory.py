"""EnhancedContextualMemory (test-fleet stand-in): a health server only.

Serves a health server on HEALTH_CHECK_PORT only.
Its ports come from AGENT_PORT and HEALTH_CHECK_PORT, else from the defaults baked in
below, as in the real script.
"""

import os
import sys

# As the real agents do: the repository root on sys.path, found from this file.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from common.standin import run_agent  # noqa: E402

DEFAULT_PORT = None  # it serves no main port
DEFAULT_HEALTH_PORT = 5632  # used when HEALTH_CHECK_PORT is not set

if __name__ == "__main__":
    run_agent("EnhancedContextualMemory", DEFAULT_PORT, health_server=True,
              default_health_port=DEFAULT_HEALTH_PORT)
