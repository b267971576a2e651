"""Where secret values come from, and what may hold them.

The store is a folder on a memory filesystem: `$CREDENTIALS_DIRECTORY` (systemd's
LoadCredential=/LoadCredentialEncrypted=) wins over the configured `secrets.dir`. A file
of the store is used only if it is safe: a regular file inside the folder (no symlink out
of it), readable by its owner alone, owned by the supervisor's user or root, and on
tmpfs/ramfs (unless `secrets.require_memory_fs: false`). Each refusal has its own message
naming the file, never its content.

Values are read at spawn and handed straight to the child (its environment, or a
per-agent folder of files); they are never kept by the supervisor, never put in argv,
never logged, never shown by `status`.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from supervisor.config.model import AgentSpec, SecretsConfig
from supervisor.paths import SECRETS_DIR

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class SecretError(Exception):
    """A secret that cannot be used. The message names the file, never the value."""


def secrets_dir(cfg: SecretsConfig, name: str,
                env: Mapping[str, str] = os.environ) -> Path | None:
    """The folder that holds secret `name`: systemd's credentials first, then
    secrets.dir (where sealed secrets are unsealed), name by name."""
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (cfg.dir is None or os.path.lexists(os.path.join(creds, name))):
        return Path(creds)
    return cfg.dir


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The type of the filesystem holding path (the longest mount point above it)."""
    target = os.path.realpath(path)
    best, fstype = "", None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, right.split()[0]
    return fstype


def check_file(folder: Path, name: str, require_memory_fs: bool = True) -> Path:
    """The path of secret `name` if it is safe to use; SecretError saying why not."""
    if not name or "/" in name or name in (".", ".."):
        raise SecretError(f"secret {name!r}: not a file name")
    path = folder / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise SecretError(f"secret {name}: {path} does not exist") from None
    except OSError as exc:
        raise SecretError(f"secret {name}: cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(path))
        if Path(os.path.realpath(folder)) not in real.parents:
            raise SecretError(f"secret {name}: {path} is a symlink out of {folder} "
                              f"(to {real}); refusing it")
        try:
            st = real.stat()
        except OSError as exc:
            raise SecretError(f"secret {name}: {path} is a broken symlink: "
                              f"{exc.strerror}") from None
        path = real
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"secret {name}: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecretError(f"secret {name}: {path} is readable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 0400 it")
    if st.st_uid not in (0, os.geteuid()):
        raise SecretError(f"secret {name}: {path} is owned by uid {st.st_uid}, not by the "
                          f"supervisor's user ({os.geteuid()}) or root")
    if require_memory_fs:
        fstype = filesystem_type(path)
        if fstype not in MEMORY_FILESYSTEMS:
            raise SecretError(f"secret {name}: {path} is on {fstype or 'an unknown'} "
                              "filesystem, not tmpfs/ramfs: a secret on disk outlives "
                              "reboots and backups (set secrets.require_memory_fs: false "
                              "to allow it)")
    return path


def read_secret(cfg: SecretsConfig, name: str, env: Mapping[str, str] = os.environ) -> str:
    folder = secrets_dir(cfg, name, env)
    if folder is None:
        raise SecretError(
            f"secret {name}: no secrets directory (set secrets.dir or run under systemd "
            "with LoadCredential=)"
        )
    path = check_file(folder, name, cfg.require_memory_fs)
    try:
        value = path.read_text()
    except OSError as exc:
        raise SecretError(f"secret {name}: cannot read {path}: {exc.strerror}") from None
    # Files written with `echo` end in a newline that is not part of the password.
    return value[:-1] if value.endswith("\n") else value


def fingerprint(cfg: SecretsConfig, name: str,
                env: Mapping[str, str] = os.environ) -> tuple[int, ...] | None:
    """What changes when a secret file is rotated (replaced or rewritten) or made safe
    to use; None if it is missing. Cheap: one stat, no read."""
    folder = secrets_dir(cfg, name, env)
    if folder is None:
        return None
    try:
        st = (folder / name).stat()
    except OSError:
        return None
    # Mode and owner: `chmod 0400` (what check_file's refusal advises) or a chown
    # changes neither content nor mtime, and must still wake the agent it stopped.
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid


def referenced(spec: AgentSpec) -> frozenset[str]:
    """The secrets an agent uses: the ${NAME} of its environment that load found in the
    secret store (spec.secret_names; a ${PYTHONPATH} is the supervisor's environment, not
    a secret) and its secrets.files."""
    return frozenset(spec.secret_names) | frozenset(spec.secret_files)


@dataclass(frozen=True)
class AgentFolder:
    """An agent's own folder of secret files, on a memory filesystem, holding only the
    secrets it references, owned by the agent's user, mode 0400 files in a 0500 folder."""

    path: Path

    def write(self, values: Mapping[str, str], uid: int, gid: int) -> None:
        self.remove()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700)
        for name, value in values.items():
            fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(value)
            os.chown(self.path / name, uid, gid)
        os.chown(self.path, uid, gid)
        os.chmod(self.path, 0o500)

    def remove(self) -> None:
        if self.path.exists():
            os.chmod(self.path, 0o700)
            shutil.rmtree(self.path, ignore_errors=True)


def agent_folder(runtime_dir: Path, agent: str) -> AgentFolder:
    return AgentFolder(runtime_dir / SECRETS_DIR / agent)


def agent_folders(runtime_dir: Path) -> list[AgentFolder]:
    """Every agent's folder in runtime_dir, e.g. those a dead supervisor left."""
    try:
        return [AgentFolder(p) for p in sorted((runtime_dir / SECRETS_DIR).iterdir())
                if p.is_dir()]
    except OSError:
        return []


def unseal_into_store(cfg: SecretsConfig) -> list[str]:
    """Sealed files (secrets.sealed_dir) decrypted into secrets.dir at start: the only
    place a sealed value is ever decrypted. SecretError if that cannot be done safely."""
    from supervisor import sealed

    if cfg.sealed_dir is None:
        return []
    if cfg.dir is None or cfg.key_file is None:
        raise SecretError("secrets.sealed_dir needs secrets.dir (where to unseal) and "
                          "secrets.key_file")
    if cfg.require_memory_fs:
        check_memory_fs(cfg.dir)
    try:
        cfg.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return sealed.unseal_folder(cfg.sealed_dir, sealed.load_key(cfg.key_file), cfg.dir)
    except sealed.SealError as exc:
        raise SecretError(str(exc)) from None


def check_memory_fs(path: Path) -> None:
    fstype = filesystem_type(path)
    if fstype not in MEMORY_FILESYSTEMS:
        raise SecretError(f"{path} is on {fstype or 'an unknown'} filesystem, not tmpfs: "
                          "agents' secret files must not reach a disk (put runtime_dir on "
                          "tmpfs, as /run is, or set secrets.require_memory_fs: false)")


def names_in(specs: Iterable[AgentSpec]) -> frozenset[str]:
    return frozenset(n for s in specs for n in referenced(s))
