"""The nftables rules behind transparent interception: text, install, remove.

Owns one table (`table inet <name>`), and only it: everything the sidecar adds lives
there, so installing is "replace the table" and removing is "delete the table", both
atomic in one `nft -f` transaction and both idempotent, and the host's own rules are
never touched.

The one idea: match on the *socket's owner* (`meta skuid`) in the nat output hook. Each
intercepted agent runs under its own uid; its outbound TCP is redirected to the
transparent listener, which reads the original destination with SO_ORIGINAL_DST. The
sidecar runs under another uid, so its own connections to the real upstreams are never
matched and cannot loop back into it (`install` refuses a redirect for its own uid).
Not redirected: DNS (TCP port 53; UDP is never matched), and loopback connections to the
`exempt_ports` of each redirect (the sidecar's own per-upstream listeners, local services
the agent must reach directly). IPv4 goes to 127.0.0.1:to_port, IPv6 to [::1]:to_port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

# A wedged netlink socket should fail the call, not hang the supervisor.
_NFT_TIMEOUT_S = 10.0
# nat chains hook output at dstnat priority (-100), as iptables' nat OUTPUT does.
_DSTNAT_PRIORITY = -100
# Names we put into a script unquoted: a subset of nft's identifiers.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


class NftError(RuntimeError):
    """nft refused a command; the message carries nft's own stderr."""


@dataclass(frozen=True)
class Redirect:
    uid: int  # the agent's uid: every TCP connection its processes open is redirected
    to_port: int  # the transparent listener's port on 127.0.0.1 / [::1]
    exempt_ports: tuple[int, ...] = ()  # loopback ports this uid reaches directly

    def __post_init__(self):
        if isinstance(self.uid, bool) or not isinstance(self.uid, int) or self.uid < 0:
            raise ValueError(f"Redirect.uid: {self.uid!r} is not a uid")
        for what, port in (("to_port", self.to_port),
                           *(("exempt_ports", p) for p in self.exempt_ports)):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"Redirect.{what}: {port!r} is not a TCP port")


def ruleset(table: str, redirects: Sequence[Redirect]) -> str:
    """The nft script that (re)creates `table inet <table>` with these redirects; run it
    with `nft -f -`. Creating then deleting the table first makes it idempotent."""
    _check_table(table)
    lines = [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tchain output {",
        f"\t\ttype nat hook output priority {_DSTNAT_PRIORITY}; policy accept;",
    ]
    for r in redirects:
        uid = f"meta skuid {r.uid}"
        tag = f'comment "agentvisor: uid {r.uid} -> :{r.to_port}"'
        # Order matters: the exemptions end the chain (accept = no NAT) before the
        # redirect can match.
        lines.append(f"\t\t{uid} tcp dport 53 accept {tag}")
        if r.exempt_ports:
            ports = ", ".join(str(p) for p in sorted(set(r.exempt_ports)))
            lines.append(f"\t\t{uid} ip daddr 127.0.0.0/8 tcp dport {{ {ports} }} accept {tag}")
            lines.append(f"\t\t{uid} ip6 daddr ::1 tcp dport {{ {ports} }} accept {tag}")
        lines.append(f"\t\t{uid} meta l4proto tcp redirect to :{r.to_port} {tag}")
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def install(table: str, redirects: Sequence[Redirect]) -> None:
    """Replace `table inet <table>` with these redirects, atomically."""
    own = os.geteuid()
    for r in redirects:
        if r.uid == own:
            raise ValueError(f"Redirect.uid {r.uid} is the sidecar's own uid: its "
                             "connections to the upstreams would be redirected to itself")
    _nft(["-f", "-"], ruleset(table, redirects))


def remove(table: str) -> None:
    """Delete `table inet <table>`; nothing to do if it is not there."""
    _check_table(table)
    # Declaring the table first makes the delete succeed when it is absent.
    _nft(["-f", "-"], f"table inet {table}\ndelete table inet {table}\n")


def exists(table: str) -> bool:
    """Whether `table inet <table>` is installed (False where nft cannot tell)."""
    _check_table(table)
    try:
        _nft(["list", "table", "inet", table], "")
    except (NftError, OSError):
        return False
    return True


def available() -> str | None:
    """None if nft can install our rules here, else why not."""
    if shutil.which("nft") is None:
        return "the nft command is not installed (Debian/Ubuntu: apt-get install nftables)"
    if os.geteuid() != 0:
        return "nftables rules need root (or CAP_NET_ADMIN)"
    probe = "agentvisor_probe"
    try:
        # --check runs the transaction in the kernel without committing it: proves
        # nf_tables and its nat support, changes nothing.
        _nft(["--check", "-f", "-"], ruleset(probe, [Redirect(65534, 1)]))
    except (NftError, OSError) as exc:
        return f"nftables is not usable here: {exc}"
    return None


def _check_table(table: str) -> None:
    if not isinstance(table, str) or not _TABLE_NAME.match(table):
        raise ValueError(f"nftables table name {table!r}: use letters, digits and _")


def _nft(args: list[str], script: str) -> None:
    try:
        done = subprocess.run(["nft", *args], input=script, capture_output=True, text=True,
                              timeout=_NFT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise NftError(f"nft {' '.join(args)} did not finish in {_NFT_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise NftError(f"nft {' '.join(args)} failed: {detail}")
