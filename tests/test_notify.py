"""atlas_milter.notify speaks systemd's NOTIFY_SOCKET protocol: checked against a real
AF_UNIX datagram socket, path-based and abstract."""

import os
import socket

from atlas_milter.notify import notify_address, sd_notify


def _receiver(addr):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(2)
    return sock


def test_path_socket_receives_ready(tmp_path):
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        assert sd_notify("READY=1\nSTATUS=listening", env={"NOTIFY_SOCKET": path})
        assert rx.recv(4096) == b"READY=1\nSTATUS=listening"


def test_abstract_socket_receives_ready():
    name = f"atlas-test-notify-{os.getpid()}"
    with _receiver(b"\0" + name.encode()) as rx:
        assert sd_notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert rx.recv(4096) == b"READY=1"


def test_uses_process_environment(tmp_path, monkeypatch):
    path = str(tmp_path / "n")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with _receiver(path) as rx:
        assert sd_notify("STOPPING=1")
        assert rx.recv(4096) == b"STOPPING=1"


def test_no_socket_is_a_noop(tmp_path):
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert sd_notify("READY=1", env={}) is False


def test_dead_socket_does_not_raise(tmp_path):
    assert sd_notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
