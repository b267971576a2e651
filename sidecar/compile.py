"""Compile the sidecar's hot path to C with mypyc: `python -m sidecar.compile`.

The hot path is plain, typed Python. Interpreted, the L7 proxy's own work per request
(heads, breaker, deadline, metrics: about 900 bytecodes) costs more CPU than the
event loop and parser under it; compiled by mypyc, the same source does it in about 45 %
fewer instructions (bench/l7_instructions.py). `make install` runs this module, and the
sidecar logs at start-up which of the two it runs.

The modules below are compiled as one group (calls between them are C calls), into
extension modules beside their sources, which Python imports in preference to the
`.py`. So the rule is: after editing one of them, compile again (`make` does it when a
source is newer than its extension); `python -m sidecar.compile --check` says whether
they are current, and the test suite refuses to run on stale ones.

AGENTVISOR_PURE_PYTHON=1 in the environment makes `import sidecar` load the sources
instead (see sidecar/__init__.py): the same behaviour, slower. The tests run both ways.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from sidecar import HOT_PATH as MODULES

ROOT = Path(__file__).resolve().parent.parent
# The group's shared library (mypyc's runtime and the modules' code), inside the package
# so that an editable install finds it like any other submodule; mypyc adds "__mypyc".
GROUP = "sidecar.hot_path"
GROUP_LIBRARY = GROUP + "__mypyc"
# Touched after a whole build, removed with the modules: what `make` compares with the
# sources' times.
STAMP = ROOT / "sidecar" / ".compiled-stamp"


def source(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def extensions(module: str) -> list[Path]:
    """The compiled forms of `module` present beside its source, for this Python."""
    base = source(module).with_suffix("")
    return [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (p := base.with_name(base.name + suffix)).exists()]


def stale() -> list[str]:
    """Why the compiled hot path does not match the sources: one line per problem; empty
    when it is current, or when none is compiled at all (the sources run)."""
    built = {m: extensions(m) for m in MODULES}
    if not any(built.values()):
        return []
    problems = []
    for module, found in built.items():
        if not found:
            problems.append(f"{source(module).relative_to(ROOT)}: not compiled (the group "
                            "is all or none)")
        elif source(module).stat().st_mtime > min(p.stat().st_mtime for p in found):
            problems.append(f"{source(module).relative_to(ROOT)}: changed since it was "
                            "compiled")
    return problems


def remove() -> int:
    """Delete the compiled modules (the sources run again); how many files went."""
    STAMP.unlink(missing_ok=True)
    gone = 0
    for path in [p for m in MODULES for p in extensions(m)] + extensions(GROUP_LIBRARY):
        path.unlink()
        gone += 1
    return gone


def missing() -> list[str]:
    """What the build needs and this machine lacks, one line each, with the fix."""
    problems = []
    if importlib.util.find_spec("mypyc") is None:
        problems.append("no mypyc: .venv/bin/pip install -e '.[compile]' (make install does)")
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "gcc"), "gcc", "cc")):
        problems.append("no C compiler: apt-get install gcc")
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        problems.append(f"no Python headers in {include}: apt-get install python3-dev")
    return problems


def build() -> None:
    """Compile the group in place. Needs mypy (which carries mypyc) and a C compiler."""
    import warnings

    from mypyc.build import mypycify
    from setuptools import setup

    warnings.filterwarnings("ignore", module="setuptools")  # its notes on our pyproject

    os.chdir(ROOT)  # extensions land beside their sources
    started = time.monotonic()
    print(f"compiling {len(MODULES)} modules with mypyc (under a minute)...", flush=True)
    # The options of [tool.mypy] in pyproject.toml, given here too, so that a tree
    # without it (an installed package) compiles the same: httptools and uvloop carry no
    # type information, and the modules around the hot path are read, not checked.
    ext_modules = mypycify(["--ignore-missing-imports", "--follow-imports=silent",
                            "--python-version=%d.%d" % sys.version_info[:2],
                            *(str(source(m).relative_to(ROOT)) for m in MODULES)],
                           opt_level="3", group_name=GROUP, verbose=False)
    setup(name="agentvisor-hot-path", ext_modules=ext_modules,
          script_args=["--quiet", "build_ext", "--inplace"])
    # Each module's own extension is a shim that loads the group's library, rewritten
    # only when the module list changes: date them all by this build, for `stale`.
    for path in [p for m in MODULES for p in extensions(m)] + extensions(GROUP_LIBRARY):
        path.touch()
    STAMP.touch()
    print(f"compiled in {time.monotonic() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sidecar.compile",
        description="Compile the sidecar's hot path with mypyc, in place.")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true",
                      help="exit 1 if compiled modules are older than their sources")
    what.add_argument("--remove", action="store_true",
                      help="delete the compiled modules, so that the sources run")
    args = ap.parse_args(argv)
    if args.check:
        problems = stale()
        for line in problems:
            print(line)
        return 1 if problems else 0
    if args.remove:
        print(f"removed {remove()} compiled files")
        return 0
    problems = missing()
    if problems:
        for line in problems:
            print(f"cannot compile the hot path: {line}", file=sys.stderr)
        return 1
    remove()  # a failed build must not leave a mix of old and new behind
    try:
        build()
    except SystemExit as exc:  # setuptools reports a compiler failure this way
        print(f"compile failed ({exc}); the sidecar runs its Python sources",
              file=sys.stderr)
        remove()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
