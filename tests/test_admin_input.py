"""Hostile input on the admin API (issue 20, item 12): deeply nested JSON and unknown fields get a 400
naming the problem, nothing changes, and the master logs no traceback. The body checks are tested in
process; one real fastlb (two workers: the master answers the API) proves the whole path."""
import http.client
import json

import pytest

from fastlb import admin
from procs import free_port, port_open, wait_until
from test_ops import TOKEN, api, backends_view, token_file  # noqa: F401  (token_file: fixture)


def nested(levels: int) -> bytes:
    """{"address": [[[...]]]}: `levels` levels of arrays inside the object."""
    return b'{"address": ' + b"[" * levels + b"]" * levels + b"}"


def test_nesting_is_measured_outside_strings():
    assert admin._json_depth(b'{"a": 1}') == 1
    assert admin._json_depth(b'{"a": {"b": [1, {"c": 2}]}}') == 4
    assert admin._json_depth(b'{"a": "[[[[{{{{", "b": "\\\\", "c": "\\"[[[["}') == 1
    assert admin._json_depth(nested(1000)) == 1001


def test_deep_body_is_a_400_before_parsing():
    with pytest.raises(admin.HttpError) as error:
        admin._parse_body(nested(1000))
    assert error.value.status == 400 and "nested 1001 levels" in str(error.value)
    assert admin._parse_body(b'{"weight": 2}') == {"weight": 2}


@pytest.mark.parametrize("path, body, field", [
    ("/api/backends", {"address": "127.0.0.1:1", "colour": "red"}, "colour"),
    ("/api/backends/127.0.0.1:1/weight", {"weight": 2, "wieght": 3}, "wieght"),
    ("/api/backends/127.0.0.1:1/state", {"state": "drain", "reason": "x"}, "reason"),
    ("/api/reload", {"force": True}, "force"),
])
def test_unknown_fields_are_named(path, body, field):
    with pytest.raises(admin.HttpError) as error:
        admin._check_fields(path, body)
    assert error.value.status == 400 and repr(field) in str(error.value)


def test_known_fields_pass():
    admin._check_fields("/api/backends", {"address": "127.0.0.1:1", "weight": 2, "backup": True})
    admin._check_fields("/api/backends/127.0.0.1:1/weight", {"weight": 2})
    admin._check_fields("/api/backends/127.0.0.1:1/state", {"state": "drain"})


def raw_post(port, path, body: bytes):
    """An authenticated POST of exact body bytes: (status, JSON answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("POST", path, body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_hostile_admin_bodies_get_a_400_and_change_nothing(procs, token_file):  # noqa: F811
    _, ports = procs.http_backends("a")
    port, admin_port = free_port(), free_port()
    lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                      "--workers", "2", "--admin", str(admin_port), "--admin-token-file", token_file)
    wait_until(lambda: port_open(admin_port), what="the admin bind")
    status, answer = raw_post(admin_port, "/api/backends", nested(1000))
    assert status == 400 and "nested" in answer["error"]
    status, answer = raw_post(admin_port, "/api/backends", json.dumps(
        {"address": "127.0.0.1:9", "colour": "red"}).encode())
    assert status == 400 and "'colour'" in answer["error"]
    status, answer = raw_post(admin_port, "/api/backends", json.dumps(
        {"address": "127.0.0.1:9", "backup": "no"}).encode())
    assert status == 400 and "backup" in answer["error"]
    status, answer = raw_post(admin_port, f"/api/backends/127.0.0.1:{ports['a']}/weight",
                              b'{"weight": ' + b"[" * 50 + b"]" * 50 + b"}")
    assert status == 400
    assert set(backends_view(admin_port)) == {f"127.0.0.1:{ports['a']}"}
    # A good change still works, and nothing went wrong on the way.
    api(admin_port, "POST", "/api/backends", {"address": "127.0.0.1:9", "weight": 2}, expect=201)
    assert "Traceback" not in lb.output and "RecursionError" not in lb.output
    assert "admin request failed" not in lb.output
