"""The one loopback test both front doors use."""

from atlas_milter.netaddr import is_loopback, is_loopback_literal


def test_loopback_literals_and_names():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "::1%lo", "localhost", "LOCALHOST",
                 "localhost.localdomain", "ip6-localhost"):
        assert is_loopback(host), host
        assert is_loopback_literal(host), host


def test_other_addresses_and_names_are_not_loopback():
    for host in ("10.0.0.1", "192.168.1.5", "[2001:db8::1]", "::", "0.0.0.0", "", "[localhost]",
                 "imap.example.org", "no-such-host.invalid"):
        assert not is_loopback(host), host
        assert not is_loopback_literal(host), host


def test_a_name_counts_when_all_its_addresses_are_loopback(monkeypatch):
    import socket

    answers = {"only-lo": ["127.0.1.1", "::1"], "mixed": ["127.0.0.1", "192.0.2.7"]}

    def fake(name, *_a, **_k):
        if name not in answers:
            raise socket.gaierror("unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answers[name]]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert is_loopback("only-lo")
    assert not is_loopback("mixed")
    assert not is_loopback_literal("only-lo")  # the literal check never resolves
