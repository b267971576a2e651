import os
import shutil
import stat
import subprocess

import pytest

from supervisor import sealed
from supervisor.sealed import SealError

VALUE = b"hunter2-correct-horse\n"


def _key() -> bytes:
    return os.urandom(32)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip(tmp_path):
    key = _key()
    path = sealed.seal_to_file("NATS_PASSWORD", VALUE, key, tmp_path)
    assert path == tmp_path / "NATS_PASSWORD.sealed"
    assert _mode(path) == 0o644
    text = path.read_text()
    assert text.startswith("agentvisor-sealed v1\n") and text.count("\n") == 2
    assert VALUE.strip() not in path.read_bytes()
    assert sealed.unseal("NATS_PASSWORD", path.read_bytes(), key) == VALUE  # newline kept
    assert sealed.unseal("E", sealed.seal("E", b"", key), key) == b""


def test_seal_is_randomised(tmp_path):
    key = _key()
    assert sealed.seal("A", VALUE, key) != sealed.seal("A", VALUE, key)


def test_wrong_key_names_the_file(tmp_path):
    path = sealed.seal_to_file("NATS_PASSWORD", VALUE, _key(), tmp_path)
    with pytest.raises(SealError) as err:
        sealed.unseal("NATS_PASSWORD", path.read_bytes(), _key(), source=str(path))
    assert str(path) in str(err.value)
    assert "authentication failed" in str(err.value)


def test_any_flipped_byte_is_refused():
    key = _key()
    blob = sealed.seal("TOKEN", VALUE, key)
    for i in range(len(blob)):
        for mask in (0x01, 0x20, 0x80):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(SealError):
                sealed.unseal("TOKEN", bytes(bad), key)
    with pytest.raises(SealError):
        sealed.unseal("TOKEN", blob[:-2] + b"\n", key)  # truncated
    with pytest.raises(SealError):
        sealed.unseal("TOKEN", blob + b"\n", key)  # extra line


def test_renamed_file_fails_authentication(tmp_path):
    key = _key()
    path = sealed.seal_to_file("DB_PASSWORD", VALUE, key, tmp_path)
    path.rename(tmp_path / "API_TOKEN.sealed")
    with pytest.raises(SealError, match="authentication failed"):
        sealed.unseal_folder(tmp_path, key, tmp_path / "store")


def test_bad_header_says_not_a_sealed_file():
    key = _key()
    with pytest.raises(SealError, match="not an agentvisor sealed file") as err:
        sealed.unseal("X", b"password=" + VALUE, key, source="sealed/X.sealed")
    assert "sealed/X.sealed" in str(err.value)
    body = sealed.seal("X", VALUE, key).split(b"\n", 1)[1]
    with pytest.raises(SealError, match="unsupported sealed file version"):
        sealed.unseal("X", b"agentvisor-sealed v9\n" + body, key)


def test_error_messages_never_contain_the_plaintext(tmp_path):
    key = _key()
    secret = b"s3cr3t-Value-XYZ"
    cases = [
        (b"agentvisor-sealed v1\n", key),  # header only
        (secret, key),  # a plaintext file where a sealed one should be
        (b"agentvisor-sealed v1\n" + secret + b"\n", key),
        (b"agentvisor-sealed v2\n" + secret + b"\n", key),
        (sealed.seal("N", secret, key), _key()),
    ]
    for blob, k in cases:
        with pytest.raises(SealError) as err:
            sealed.unseal("N", blob, k)
        assert secret.decode() not in str(err.value)
        assert "s3cr3t" not in repr(err.value)


def test_key_file_with_open_permissions_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(SealError, match="readable by group or others") as err:
        sealed.load_key(path)
    assert str(path) in str(err.value)
    path.chmod(0o600)
    assert len(sealed.load_key(path)) == 32


def test_key_file_of_wrong_size_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(31))
    path.chmod(0o400)
    with pytest.raises(SealError, match="exactly 32 bytes"):
        sealed.load_key(path)


def test_generate_key_writes_0400_and_refuses_overwrite(tmp_path):
    path = tmp_path / "key"
    sealed.generate_key(path)
    assert _mode(path) == 0o400
    key = sealed.load_key(path)
    assert len(key) == 32
    with pytest.raises(SealError, match="refusing to overwrite"):
        sealed.generate_key(path)
    assert sealed.load_key(path) == key


def test_unseal_folder_writes_0400_exact_values(tmp_path):
    key = _key()
    src, store = tmp_path / "sealed", tmp_path / "store"
    src.mkdir()
    store.mkdir()
    values = {"A": b"alpha", "B_2": b"with newline\n", "EMPTY": b""}
    for name, value in values.items():
        sealed.seal_to_file(name, value, key, src)
    (src / "README.md").write_text("not a sealed file\n")
    assert sealed.unseal_folder(src, key, store) == sorted(values)
    assert sorted(p.name for p in store.iterdir()) == sorted(values)
    for name, value in values.items():
        assert (store / name).read_bytes() == value
        assert _mode(store / name) == 0o400
    # A second run replaces the read-only files in place.
    sealed.seal_to_file("A", b"alpha2", key, src)
    sealed.unseal_folder(src, key, store)
    assert (store / "A").read_bytes() == b"alpha2"


def test_unseal_folder_leaves_nothing_for_a_bad_file(tmp_path):
    key = _key()
    src, store = tmp_path / "sealed", tmp_path / "store"
    src.mkdir()
    store.mkdir()
    sealed.seal_to_file("GOOD", b"fine", key, src)
    bad = sealed.seal_to_file("BAD", b"tampered", key, src)
    blob = bytearray(bad.read_bytes())
    blob[-5] ^= 0x01
    bad.write_bytes(bytes(blob))
    with pytest.raises(SealError) as err:
        sealed.unseal_folder(src, key, store)
    assert str(bad) in str(err.value)
    assert "tampered" not in str(err.value)
    assert list(store.iterdir()) == []


def _systemd_creds_works() -> str | None:
    """None if systemd-creds can encrypt here, else why not."""
    if not sealed.systemd_creds_available():
        return "systemd-creds is not installed or does not answer"
    try:
        done = subprocess.run(
            [shutil.which("systemd-creds"), "encrypt", "--name=PROBE", "-", "-"],
            input=b"probe", capture_output=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"systemd-creds cannot run: {exc}"
    if done.returncode != 0:
        return f"systemd-creds encrypt does not work here: {done.stderr.decode(errors='replace').strip()}"
    return None


def test_seal_with_systemd_creds(tmp_path):
    reason = _systemd_creds_works()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "NATS_PASSWORD.cred"
    sealed.seal_with_systemd_creds("NATS_PASSWORD", VALUE, out)
    assert VALUE.strip() not in out.read_bytes()
    done = subprocess.run(
        ["systemd-creds", "decrypt", "--name=NATS_PASSWORD", str(out), "-"],
        capture_output=True, timeout=30,
    )
    assert done.returncode == 0 and done.stdout == VALUE
    with pytest.raises(SealError, match="systemd-creds encrypt failed"):
        sealed.seal_with_systemd_creds("X", VALUE, tmp_path / "no-such-dir" / "X.cred")
