"""Sealed secrets: encrypted secret files that are safe to commit beside the config.

`agentvisor secrets seal NAME` reads a value on stdin and writes `NAME.sealed`. At start
the supervisor unseals every `*.sealed` file into its tmpfs secret store, where `${NAME}`
placeholders find them like any other secret file. The key is 32 random bytes in a file of
mode 0400 that never goes into the repository. Copy it to the hosts that run the config the
way you copy any host credential.

A sealed file is two lines of text, so it diffs and commits cleanly:

    agentvisor-sealed v1
    <base64 of nonce (12 bytes) + AES-256-GCM ciphertext + tag (16 bytes)>

The associated data is `agentvisor-sealed v1\\0NAME`, so the secret's name is authenticated
along with its value. If you rename `DB_PASSWORD.sealed` to `API_TOKEN.sealed` (which
would hand one agent's secret to another), authentication fails, as it does for a wrong
key or any changed byte. The encoding is strict: one LF-terminated base64 line with
canonical padding. If git converts line endings, add `*.sealed text eol=lf` to
.gitattributes. Errors name the file and what is wrong, never any content. A value is
sealed byte for byte as given, so a trailing newline from `echo` is kept (the secret reader
drops one).

Relation to systemd credentials. Where systemd is PID 1, the native way is
`systemd-creds encrypt --name=NAME - NAME.cred` plus `LoadCredentialEncrypted=NAME:/path/NAME.cred`
in the unit. systemd decrypts the credential into `$CREDENTIALS_DIRECTORY` itself before
the supervisor starts. The credential is bound to this host's TPM2 and/or its host key
(/var/lib/systemd/credential.secret), so the file is useless on any other host. agentvisor
reads `$CREDENTIALS_DIRECTORY` first, so prefer this wherever it is available
(`seal_with_systemd_creds` writes such a file). Use agentvisor sealed files where
systemd-creds is not available (containers, no systemd PID 1, an old systemd), or where one
config repository is shared across hosts and you would rather distribute one key than seal
every secret once per host.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = "agentvisor-sealed v1"
SUFFIX = ".sealed"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

# A secret name becomes a file name in the store: no separators, no leading dot (temp files).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")


class SealError(Exception):
    """A key or sealed file that cannot be used. The message names the file, never content."""


def _check_name(name: str, source: str) -> None:
    if not _NAME.fullmatch(name):
        raise SealError(f"{source or 'sealed secret'}: invalid secret name {name!r}")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise SealError(f"sealing key must be {KEY_BYTES} bytes")


def _aad(name: str) -> bytes:
    return MAGIC.encode() + b"\0" + name.encode()


# --- key ---------------------------------------------------------------------------------

def generate_key(path: Path) -> None:
    """Write a new random key to `path` (mode 0400). Never overwrites an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o400)
    except FileExistsError:
        raise SealError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise SealError(f"{path}: cannot create key file: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o400)
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise SealError(f"{path}: cannot write key file: {exc.strerror}") from None
    os.close(fd)


def load_key(path: Path) -> bytes:
    """Read the key at `path`, refusing one that others could read or that is malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SealError(f"{path}: cannot open key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealError(f"{path}: key is not a regular file")
        if st.st_mode & 0o077:
            raise SealError(
                f"{path}: key file is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 0400 it"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise SealError(f"{path}: key file is owned by uid {st.st_uid}, not by us or root")
        key = os.read(fd, KEY_BYTES + 1)
    except OSError as exc:
        raise SealError(f"{path}: cannot read key file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise SealError(f"{path}: key file must hold exactly {KEY_BYTES} bytes")
    return key


# --- seal / unseal -----------------------------------------------------------------------

def seal(name: str, value: bytes, key: bytes) -> bytes:
    """The content of NAME.sealed for `value`."""
    _check_name(name, "")
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    sealed = nonce + AESGCM(key).encrypt(nonce, value, _aad(name))
    return f"{MAGIC}\n{base64.b64encode(sealed).decode()}\n".encode()


def unseal(name: str, blob: bytes, key: bytes, *, source: str = "") -> bytes:
    """The value sealed in `blob` under `name`. `source` (a path) is what errors name."""
    where = source or f"{name}{SUFFIX}"
    _check_name(name, where)
    _check_key(key)
    text = blob.decode("latin-1")  # any byte decodes; non-ASCII then fails the checks below
    header, _, rest = text.partition("\n")
    if header != MAGIC:
        if header.startswith("agentvisor-sealed "):
            raise SealError(f"{where}: unsupported sealed file version (this agentvisor reads {MAGIC!r})")
        raise SealError(f"{where}: not an agentvisor sealed file (first line is not {MAGIC!r})")
    body = rest[:-1] if rest.endswith("\n") else None
    try:
        if body is None or "\n" in body:
            raise ValueError
        sealed = base64.b64decode(body, validate=True)
        # Non-canonical padding bits would let a changed character decode to the same bytes.
        if base64.b64encode(sealed).decode() != body:
            raise ValueError
    except (ValueError, binascii.Error):
        raise SealError(f"{where}: malformed sealed file (expected one line of base64 after the header)") from None
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SealError(f"{where}: malformed sealed file (too short)")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(name))
    except InvalidTag:
        raise SealError(
            f"{where}: authentication failed: wrong key, or the file was altered or renamed"
        ) from None


def seal_to_file(name: str, value: bytes, key: bytes, folder: Path) -> Path:
    """Write folder/NAME.sealed atomically, mode 0644 (it is safe to commit)."""
    content = seal(name, value, key)
    target = folder / f"{name}{SUFFIX}"
    try:
        _write_atomic(target, content, 0o644, durable=True)
    except OSError as exc:
        raise SealError(f"{target}: cannot write: {exc.strerror}") from None
    return target


def unseal_folder(sealed_dir: Path, key: bytes, store: Path) -> list[str]:
    """Unseal every *.sealed file in `sealed_dir` into store/NAME (mode 0400).

    Every file is decrypted before any is written, so a bad file leaves nothing behind.
    Returns the names, sorted.
    """
    try:
        paths = sorted(p for p in sealed_dir.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    except OSError as exc:
        raise SealError(f"{sealed_dir}: cannot list sealed files: {exc.strerror}") from None
    values: dict[str, bytes] = {}
    for path in paths:
        name = path.name[: -len(SUFFIX)]
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise SealError(f"{path}: cannot read: {exc.strerror}") from None
        values[name] = unseal(name, blob, key, source=str(path))
    for name, value in values.items():
        target = store / name
        try:
            _write_atomic(target, value, 0o400, durable=False)
        except OSError as exc:
            raise SealError(f"{target}: cannot write secret: {exc.strerror}") from None
    return list(values)


def _write_atomic(target: Path, content: bytes, mode: int, *, durable: bool) -> None:
    """Write `content` to a temp file created with `mode` beside `target`, then rename."""
    tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want (0644)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- systemd-creds -----------------------------------------------------------------------

def systemd_creds_available() -> bool:
    """Whether `systemd-creds` is installed and answers."""
    exe = shutil.which("systemd-creds")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def seal_with_systemd_creds(name: str, value: bytes, out: Path) -> None:
    """Encrypt `value` with `systemd-creds encrypt --name=NAME - OUT` (for LoadCredentialEncrypted=)."""
    _check_name(name, str(out))
    exe = shutil.which("systemd-creds")
    if exe is None:
        raise SealError(f"{out}: systemd-creds is not installed")
    try:
        done = subprocess.run(
            [exe, "encrypt", f"--name={name}", "-", str(out)],
            input=value, capture_output=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SealError(f"{out}: cannot run systemd-creds: {exc}") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise SealError(f"{out}: systemd-creds encrypt failed: {err}")
