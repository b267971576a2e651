"""The credential audit's pure rules: which lines and processes hold a plaintext credential,
what is not one (placeholders are the fix), and that no finding ever shows the value."""

import base64
from urllib.parse import quote

import pytest

from supervisor.scan import (
    ASSIGNMENT, AUTH_HEADER, HIGH_ENTROPY, KNOWN_SECRET, PRIVATE_KEY, URL_CREDENTIALS,
    AllowList, Finding, ProcessInfo, key_kind, language, literal_secret, needles,
    scan_process, scan_text, shannon_entropy,
)


def rules(path, text, known=None):
    return [(f.line, f.rule) for f in scan_text(path, text, known)]


def assert_never_shows(findings, *values):
    for f in findings:
        for v in values:
            assert v not in str(f) and v not in f.detail and v not in f.path, (v, f)


# --- credential-assignment: what operators grep for ------------------------------------


@pytest.mark.parametrize("path, line", [
    ("host.yaml", 'NATS_PASSWORD: "s3cr3t-Pl4nted-9f8e7d"'),
    ("host.yaml", "NATS_PASSWORD: s3cr3t-Pl4nted-9f8e7d"),
    ("host.yaml", "      env_vars: {NATS_PASSWORD: s3cr3t-Pl4nted-9f8e7d, LOG_LEVEL: info}"),
    ("host.yaml", "nats_password: s3cr3t-Pl4nted-9f8e7d"),
    ("host.yaml", "REDIS_AUTH: s3cr3t-Pl4nted-9f8e7d"),
    ("host.yaml", "OPENAI_API_KEY: s3cr3t-Pl4nted-9f8e7d"),
    ("host.yaml", "ACCESS_TOKEN: s3cr3t-Pl4nted-9f8e7d"),
    ("host.yaml", "- password: s3cr3t-Pl4nted-9f8e7d"),
    ("agent.env", "NATS_PASSWORD=s3cr3t-Pl4nted-9f8e7d"),
    ("start.sh", "export NATS_PASSWORD='s3cr3t-Pl4nted-9f8e7d'"),
    ("start.sh", "REDIS_PASSWORD=${REDIS_PASSWORD:-s3cr3t-Pl4nted-9f8e7d} python a.py"),
    ("nats.conf", "  password: s3cr3t-Pl4nted-9f8e7d"),
    ("app.ini", "password = s3cr3t-Pl4nted-9f8e7d"),
    ("app.toml", 'api_key = "s3cr3t-Pl4nted-9f8e7d"'),
    ("app.json", '{"nats_password":"s3cr3t-Pl4nted-9f8e7d"}'),
    ("agent.py", 'NATS_PASSWORD = "s3cr3t-Pl4nted-9f8e7d"'),
    ("agent.py", 'os.environ["NATS_PASSWORD"] = "s3cr3t-Pl4nted-9f8e7d"'),
    ("agent.py", '    nats_password: str = "s3cr3t-Pl4nted-9f8e7d"'),
    ("agent.py", 'pw = os.getenv("NATS_PASSWORD", "s3cr3t-Pl4nted-9f8e7d")'),
    ("agent.py", 'nc = await nats.connect(s, user="agent", password="s3cr3t-Pl4nted-9f8e7d")'),
    ("agent.py", 'cfg = {"api_key": "s3cr3t-Pl4nted-9f8e7d"}'),
    ("agent.py", 'subprocess.run(["nats", "--password=s3cr3t-Pl4nted-9f8e7d"])'),
    ("Agent.java", 'String password = "s3cr3t-Pl4nted-9f8e7d";'),
    ("agent.service", "Environment=NATS_PASSWORD=s3cr3t-Pl4nted-9f8e7d"),
    ("agent.service", "# NATS_PASSWORD: s3cr3t-Pl4nted-9f8e7d  (commented out is still plaintext)"),
])
def test_literal_credentials_are_found_and_never_shown(path, line):
    findings = scan_text(path, "first: line\n" + line)
    assert [(f.line, f.rule) for f in findings] == [(2, ASSIGNMENT)]
    assert "<redacted, 21 chars>" in findings[0].detail
    assert_never_shows(findings, "s3cr3t-Pl4nted-9f8e7d", "Pl4nted")


def test_the_operators_patterns_nats_user_and_changeme_are_findings():
    assert rules("host.yaml", "nats_user: agent") == [(1, ASSIGNMENT)]
    # `changeme` is a plaintext credential like any other, only a worse one.
    assert rules("host.yaml", "NATS_PASSWORD: changeme") == [(1, ASSIGNMENT)]
    assert rules("host.yaml", "password: password") == [(1, ASSIGNMENT)]


@pytest.mark.parametrize("path, line", [
    # the fix: placeholders filled at spawn
    ("host.yaml", 'NATS_PASSWORD: "${NATS_PASSWORD}"'),
    ("host.yaml", "      env_vars: {NATS_PASSWORD: ${NATS_PASSWORD}, NATS_USER: ${NATS_USER}}"),
    ("host.yaml", "OBS_HUB_URL: ${upstream:ObservabilityHub}"),
    ("host.yaml", 'NATS_URL: "nats://${upstream:NATS}"'),
    ("host.yaml", "API_TOKEN: $${NOT_A_PLACEHOLDER}"),
    # nothing there
    ("host.yaml", "NATS_PASSWORD:"),
    ("host.yaml", 'NATS_PASSWORD: ""'),
    ("host.yaml", "NATS_PASSWORD: ''"),
    ("host.yaml", "NATS_PASSWORD: null"),
    ("host.yaml", "NATS_PASSWORD: ~"),
    ("host.yaml", "api_token: false"),
    # templates, references, masks, hashes
    ("host.yaml", "NATS_PASSWORD: <your NATS password>"),
    ("host.yaml", 'NATS_PASSWORD: "<PASSWORD>"'),
    ("host.yaml", 'NATS_PASSWORD: "{{ nats_password }}"'),
    ("host.yaml", "password: !secret nats_password"),
    ("host.yaml", "password: !vault |"),
    ("host.yaml", "password: *default_password"),
    ("host.yaml", 'password: "********"'),
    ("nats.conf", "password: $2a$11$" + "x" * 22 + "0123456789abcdefghijklmnopqrstu"),
    ("start.sh", "export NATS_PASSWORD=$NATS_PASSWORD"),
    ("start.sh", 'export NATS_PASSWORD="$(cat "$CREDENTIALS_DIRECTORY/NATS_PASSWORD")"'),
    ("start.sh", 'NATS_PASSWORD="${NATS_PASSWORD:?unset}"'),
    # keys that name, locate or configure a credential without holding it
    ("host.yaml", "NATS_URL: nats://10.0.0.1:4222"),
    ("host.yaml", "NATS_PASSWORD_FILE: /run/credentials/agentvisor.service/NATS_PASSWORD"),
    ("host.yaml", "REDIS_PORT: 6379"),
    ("host.yaml", "NATS_MAX_PAYLOAD: 1048576"),
    ("host.yaml", "TOKEN_TTL: 3600"),
    ("host.yaml", "secrets: {names: [NATS_PASSWORD]}"),
    ("host.yaml", "max_tokens: 2048"),
    ("host.yaml", "tokenizer: bert-base-uncased"),
    ("host.yaml", "author: Jane Q. Longname-Hyphenated"),
    ("host.yaml", "SSH_AUTH_SOCK: /tmp/ssh-XXXXk3jd9/agent.1234"),
    ("host.yaml", "public_key: ssh-ed25519-AAAAC3NzaC1lZDI1NTE5AAAAIG"),
    ("agentvisor.service", "LoadCredential=NATS_PASSWORD:/etc/agentvisor/credentials/nats"),
    ("agentvisor.service", "# /etc/agentvisor/nats.conf: MainPC listens on 4222"),
    # Python: expressions, labels, comparisons, strings that are not values
    ("agent.py", 'NATS_PASSWORD = os.environ["NATS_PASSWORD"]'),
    ("agent.py", "password = None"),
    ("agent.py", "token: str | None = None"),
    ("agent.py", 'if token == "expected-token-value":'),
    ("agent.py", 'PRIVATE_KEY = "private-key"'),
    ("agent.py", 'headers = {"Authorization": f"Bearer {token}"}'),
    ("agent.py", 'creds = " --username=" + user'),
    ("agent.py", 'body = b"password=" + VALUE'),
    ("agent.py", "    Token.Name.Builtin: '#cccccc',"),
    ("agent.py", "word_token = r'[^\\W\\d]\\w*'"),
    ("agent.py", '"""The secret: the value is read at spawn."""'),
])
def test_not_a_credential(path, line):
    assert scan_text(path, line) == []


def test_key_kinds():
    assert key_kind("NATS_PASSWORD") == "secret"
    assert key_kind("natsPassword") == "secret"
    assert key_kind("--nats-pass") == "secret"
    assert key_kind("OPENAI_API_KEY") == "secret"
    assert key_kind("apiKey") == "secret"
    assert key_kind("NATS_USER") == "operator"
    assert key_kind("REDIS_AUTH") == "operator"
    assert key_kind("auth_blob") == "entropy"
    assert key_kind("nats") is None  # `nats: connect error` in prose
    assert key_kind("agentvisor-nats") is None
    assert key_kind("NATS_URL") is None
    assert key_kind("publicKeyToken") is None


def test_literal_secret_per_language():
    assert literal_secret("hunter22", quoted=False, lang="yaml") == "hunter22"
    assert literal_secret("hunter22", quoted=False, lang="python") is None  # a name
    assert literal_secret("hunter22", quoted=True, lang="python") == "hunter22"
    assert literal_secret("${X:-hunter22}", quoted=False, lang="text") == "hunter22"
    assert literal_secret("${X}", quoted=True) is None
    assert literal_secret("!secret x", quoted=False, lang="yaml") is None


def test_language_from_name_or_shebang():
    assert language("agent.py") == "python"
    assert language("stubs.pyi") == "python"
    assert language("bin/agent", "#!/usr/bin/env python3") == "python"
    assert language("main.go") == "code"
    assert language("host.yml") == "yaml"
    assert language("agent.env") == "text"


# --- url-credentials -------------------------------------------------------------------


def test_url_with_a_password_is_found_and_shows_neither_password_nor_more():
    line = "NATS_URL: nats://agent:hunter22@10.0.0.1:4222"
    findings = scan_text("host.yaml", line)
    assert [f.rule for f in findings] == [URL_CREDENTIALS]
    assert findings[0].detail == "nats://agent:<redacted, 8 chars>@10.0.0.1:4222"
    assert_never_shows(findings, "hunter22")


@pytest.mark.parametrize("line, secret", [
    ("redis_url = redis://:s3cr3tpw@localhost:6379/0", "s3cr3tpw"),
    ('url = "amqp://agent:p@ss@broker:5672/"', "p@ss"),
    ("servers: nats://a:first-pw@h1:4222,nats://b:second-pw@h2:4223", "second-pw"),
    ("curl https://ghp_k3JD9aLq82Hx0PzT7mW4cB1n:x-oauth-basic@github.com/o/r",
     "ghp_k3JD9aLq82Hx0PzT7mW4cB1n"),
])
def test_url_credentials_variants(line, secret):
    findings = scan_text("notes.txt", line)
    assert findings and {f.rule for f in findings} == {URL_CREDENTIALS}
    assert_never_shows(findings, secret, "first-pw")


@pytest.mark.parametrize("line", [
    "NATS_URL: nats://10.0.0.1:4222",
    "url: nats://agent:${NATS_PASSWORD}@10.0.0.1:4222",
    "url: nats://agent:$NATS_PASSWORD@10.0.0.1:4222",
    'url = "nats://{user}:{password}@{host}"',
    "# e.g. https://username:password@host.com:80",
    "git clone git@github.com:org/repo.git",
])
def test_url_without_a_literal_password(line):
    assert scan_text("notes.txt", line) == []


# --- auth-header, private-key ----------------------------------------------------------


def test_authorization_header_in_a_log():
    line = "DEBUG send: Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.sig"
    findings = scan_text("agent.log", line)
    assert [f.rule for f in findings] == [AUTH_HEADER]
    assert_never_shows(findings, "eyJhbGciOiJIUzI1NiJ9")
    assert scan_text("agent.log", "headers: Authorization: Bearer ${TOKEN}") == []
    assert scan_text("a.py", "'authorization: basic ...' header") == []


def test_private_keys_and_nkey_seeds():
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"
    assert rules("deploy.key", pem) == [(1, PRIVATE_KEY)]
    assert rules("host.json", '{"key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0"}') \
        == [(1, PRIVATE_KEY)]
    seed = "SUAM" + "A" * 54
    findings = scan_text("agent.creds", f"nkey: {seed}")
    assert PRIVATE_KEY in {f.rule for f in findings}
    assert_never_shows(findings, seed)
    # a parser's constant is not a key
    assert scan_text("ssh.py", '_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"') == []


# --- high-entropy ----------------------------------------------------------------------


def test_shannon_entropy():
    assert shannon_entropy("") == 0
    assert shannon_entropy("aaaa") == 0
    assert shannon_entropy("abcd") == 2
    assert shannon_entropy("0123456789abcdef") == 4


def test_high_entropy_under_a_secret_looking_key():
    value = "Zk9xT2p3ZlFkR0h6bXk4UQ"
    findings = scan_text("host.yaml", f"auth_blob: {value}")
    assert [f.rule for f in findings] == [HIGH_ENTROPY]
    assert "22 chars" in findings[0].detail
    assert_never_shows(findings, value)
    # the same key with prose, a short value or a low-entropy value is not a finding
    assert scan_text("host.yaml", "auth_blob: this is not random at all") == []
    assert scan_text("host.yaml", "auth_blob: Zk9xT2p3") == []
    assert scan_text("host.yaml", "auth_blob: aaaaaaaabbbbbbbbcccc") == []
    # ... and a random value under an innocent key is not one either
    assert scan_text("host.yaml", f"build_id: {value}") == []


# --- known values ----------------------------------------------------------------------

KNOWN = {"NATS_PASSWORD": "tr1cky/v@lue+=42"}


def test_known_value_plain_url_encoded_and_base64():
    value = KNOWN["NATS_PASSWORD"]
    basic = base64.b64encode(f"agent:{value}".encode()).decode()
    text = "\n".join([
        f"connected with {value}",
        f"GET /login?pw={quote(value, safe='')}",
        f"echo {base64.b64encode(value.encode()).decode()} | base64 -d",
        f"Proxy-Authorization: Basic {basic}",
        "nothing here",
    ])
    findings = scan_text("agent.log", text, KNOWN)
    assert [(f.line, f.rule) for f in findings if f.rule == KNOWN_SECRET] == [
        (1, KNOWN_SECRET), (2, KNOWN_SECRET), (3, KNOWN_SECRET), (4, KNOWN_SECRET)]
    details = [f.detail for f in findings if f.rule == KNOWN_SECRET]
    assert details[0] == "contains the value of NATS_PASSWORD"
    assert details[1] == "contains the value of NATS_PASSWORD (URL-encoded)"
    assert details[2] == details[3] == "contains the value of NATS_PASSWORD (base64)"
    assert_never_shows(findings, value, quote(value, safe=""), basic)


def test_a_known_value_in_an_assignment_is_one_finding_that_names_the_secret():
    findings = scan_text("host.yaml", f'NATS_PASSWORD: "{KNOWN["NATS_PASSWORD"]}"', KNOWN)
    assert [(f.rule, f.detail) for f in findings] == [
        (KNOWN_SECRET, "contains the value of NATS_PASSWORD")]


def test_short_known_values_are_not_searched_for():
    assert needles({"PIN": "123"}) == []
    assert scan_text("a.log", "id 123 done", {"PIN": "123"}) == []


def test_base64_forms_need_enough_characters_to_mean_something():
    forms = {n.form for n in needles({"K": "abcd"})}
    assert "base64" not in forms  # 4-5 base64 characters would match by chance
    assert "base64" in {n.form for n in needles({"K": "abcdefghij"})}


# --- processes -------------------------------------------------------------------------


def test_process_cmdline_with_a_known_value():
    proc = ProcessInfo(4242, "python3", ("python3", "-c", "import time", "hunter2-live"))
    findings = scan_process(proc, {"NATS_PASSWORD": "hunter2-live"})
    assert [str(f) for f in findings] == [
        "pid 4242 (python3) cmdline: contains the value of NATS_PASSWORD"]


def test_process_cmdline_patterns_and_secret_flags():
    proc = ProcessInfo(7, "nats-server", (
        "nats-server", "-p", "4222", "--user", "agent", "--pass", "hunter2-flag",
        "--routes", "nats://r:hunter2-route@10.0.0.2:6222"))
    findings = scan_process(proc)
    assert {f.rule for f in findings} == {ASSIGNMENT, URL_CREDENTIALS}
    assert any(f.detail == "cmdline: --pass <redacted, 12 chars>" for f in findings)
    assert_never_shows(findings, "hunter2-flag", "hunter2-route")
    env_style = ProcessInfo(8, "sh", ("sh", "-c", "NATS_PASSWORD=hunter2-env python a.py"))
    assert [f.rule for f in scan_process(env_style)] == [ASSIGNMENT]


def test_process_environment_only_for_non_agents():
    known = {"NATS_PASSWORD": "hunter2-live"}
    leaked = ProcessInfo(9, "bash", ("bash",), {"HOME": "/root", "PW": "hunter2-live"})
    assert [str(f) for f in scan_process(leaked, known)] == [
        "pid 9 (bash) environ PW: contains the value of NATS_PASSWORD"]
    agent = ProcessInfo(10, "python3", ("python3", "agents/a.py"),
                        {"AGENTVISOR_AGENT": "ServiceRegistry", "NATS_PASSWORD": "hunter2-live"})
    assert scan_process(agent, known) == []
    unreadable = ProcessInfo(11, "sshd", ("sshd",), None)
    assert scan_process(unreadable, known) == []


def test_process_with_nothing_to_hide():
    proc = ProcessInfo(1, "python3", ("python3", "agents/a.py", "--port", "7200",
                                      "--password-file", "/run/creds/NATS_PASSWORD"))
    assert scan_process(proc, {"NATS_PASSWORD": "hunter2-live"}) == []


# --- output and allow-list -------------------------------------------------------------


def test_finding_lines():
    assert str(Finding("cfg/host.yaml", 12, ASSIGNMENT, "NATS_PASSWORD = <redacted, 8 chars>")) \
        == "cfg/host.yaml:12: credential-assignment: NATS_PASSWORD = <redacted, 8 chars>"
    assert str(Finding("pid 3 (x)", 0, KNOWN_SECRET, "cmdline: contains the value of A")) \
        == "pid 3 (x) cmdline: contains the value of A"


def test_allow_list_entries():
    allow = AllowList.parse("""
        # accepted findings
        config/host.yaml:12          # by line
        tests/fixtures/legacy.yaml:url-credentials
        docs/*.md
        examples/
        pid * (nats-server)
    """)
    f = lambda path, line=1, rule=ASSIGNMENT: Finding(path, line, rule, "x")  # noqa: E731
    assert allow.allows(f("config/host.yaml", 12))
    assert allow.allows(f("./config/host.yaml", 12))
    assert not allow.allows(f("config/host.yaml", 13))
    assert allow.allows(f("tests/fixtures/legacy.yaml", 3, URL_CREDENTIALS))
    assert not allow.allows(f("tests/fixtures/legacy.yaml", 3, ASSIGNMENT))
    assert allow.allows(f("docs/setup.md"))
    assert allow.allows(f("examples/a/b.yaml"))
    assert not allow.allows(f("examples.yaml"))
    assert allow.allows(f("pid 812 (nats-server)", 0, ASSIGNMENT))
    assert not allow.allows(f("pid 813 (python3)", 0, ASSIGNMENT))


def test_allow_list_paths_are_relative_to_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    allow = AllowList.parse("config/host.yaml:3", base=str(tmp_path / "repo"))
    assert allow.allows(Finding(str(tmp_path / "repo/config/host.yaml"), 3, ASSIGNMENT, "x"))
    assert allow.allows(Finding("repo/config/host.yaml", 3, ASSIGNMENT, "x"))
    assert not allow.allows(Finding("other/config/host.yaml", 3, ASSIGNMENT, "x"))
