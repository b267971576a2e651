"""The sidecar: the agents' traffic, bounded in time and guarded by circuit breakers.

Its hot path may be compiled (see sidecar/compile.py). AGENTVISOR_PURE_PYTHON=1 makes
this package load those modules from their sources instead: the operator's way back to
the interpreted code, and the tests' way to check that both behave the same.
"""

import os as _os

# The modules sidecar/compile.py compiles, as one group, in dependency order. All or
# none: compiled modules call each other natively, so a mix would not import.
HOT_PATH = (
    "sidecar.metrics",
    "sidecar.policy.breaker",
    "sidecar.policy.retry",
    "sidecar.upstream",
    "sidecar.proxy.tcp",
    "sidecar.proxy.http.heads",
    "sidecar.proxy.http.replies",
    "sidecar.proxy.http.pool",
    "sidecar.proxy.http.exchange",
    "sidecar.proxy.http.upstream_conn",
    "sidecar.proxy.http.agent",
)

if _os.environ.get("AGENTVISOR_PURE_PYTHON") == "1":
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    class _SourcesFirst:
        """Finds the hot-path modules as sources, before the compiled forms beside them."""

        _names = frozenset(HOT_PATH)
        _root = _Path(__file__).resolve().parent.parent

        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name not in cls._names:
                return None
            return _util.spec_from_file_location(
                name, cls._root / (name.replace(".", "/") + ".py"))

    _sys.meta_path.insert(0, _SourcesFirst)


def compiled() -> bool:
    """Whether the hot path runs compiled (mypyc) or interpreted."""
    import sidecar.proxy.http.agent as agent
    return not agent.__file__.endswith(".py")
