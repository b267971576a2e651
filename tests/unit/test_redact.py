import base64
from urllib.parse import quote

from sidecar.redact import Redactor

PASSWORD = "p@ss/w0rd+42"


def test_every_form_of_a_known_value_is_replaced_by_its_name():
    r = Redactor({"NATS_PASSWORD": PASSWORD})
    b64 = base64.b64encode(PASSWORD.encode())
    line = (b"connect nats://agent:" + quote(PASSWORD, safe="").encode() + b"@hub:4222 "
            b"password=" + PASSWORD.encode() + b" Authorization: Basic " + b64 + b"\n")
    out = r.redact(line)
    assert out.count(b"[REDACTED:NATS_PASSWORD]") == 3
    assert PASSWORD.encode() not in out and b64 not in out
    assert out.endswith(b"\n") and out.startswith(b"connect nats://agent:")


def test_lines_without_secrets_are_untouched_and_short_values_are_not_matched():
    r = Redactor({"PIN": "123", "TOKEN": "abcdefgh"})
    assert r.redact(b"order 123 shipped\n") == b"order 123 shipped\n"
    assert r.redact(b"token abcdefgh\n") == b"token [REDACTED:TOKEN]\n"
    assert not Redactor({}) and Redactor({}).redact(b"x") == b"x"


def test_a_secret_containing_another_is_replaced_whole():
    r = Redactor({"SHORT": "secret", "LONG": "secret-and-more"})
    assert r.redact(b"v=secret-and-more") == b"v=[REDACTED:LONG]"
