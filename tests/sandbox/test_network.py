"""network = false: a private network namespace with loopback only."""

from __future__ import annotations

import socket
from typing import Any

import attrs
import pytest

from liberty.jobs.sandbox import SandboxSpec

Runner = Any  # conftest.run_sandboxed

pytestmark = pytest.mark.timeout(60)


def _connect(port: int) -> str:
    return f'attempt(lambda: socket.create_connection(("127.0.0.1", {port}), timeout=5).close())'


def test_loopback_server_of_the_parent_is_unreachable(run_sandboxed: Runner, base_spec: SandboxSpec, tcp_server: int) -> None:
    socket.create_connection(("127.0.0.1", tcp_server), timeout=5).close()  # reachable from outside
    out = run_sandboxed(attrs.evolve(base_spec, network=False), f"import socket\nresult(connect={_connect(tcp_server)})")
    assert out.report["network"].applied, out.report["network"].detail
    assert out.result == {"connect": {"ok": False, "error": "ConnectionRefusedError", "errno": 111}}


def test_loopback_inside_the_namespace_works(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        attrs.evolve(base_spec, network=False),
        """
        import socket
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname(), timeout=5)
        peer, _ = server.accept()
        client.sendall(b"ping")
        result(got=peer.recv(4).decode(), interfaces=[name for _, name in socket.if_nameindex()])
        """,
    )
    assert out.result == {"got": "ping", "interfaces": ["lo"]}


def test_network_true_leaves_the_host_network(run_sandboxed: Runner, base_spec: SandboxSpec, tcp_server: int) -> None:
    out = run_sandboxed(base_spec, f"import socket\nresult(connect={_connect(tcp_server)})")
    assert "network" not in out.report
    assert out.result == {"connect": {"ok": True, "value": None}}


def test_an_unprivileged_child_gets_its_namespace_through_a_user_namespace(
    run_sandboxed: Runner, base_spec: SandboxSpec, tcp_server: int
) -> None:
    spec = attrs.evolve(base_spec, network=False, landlock=False)
    out = run_sandboxed(
        spec,
        f"""
        import socket
        result(connect={_connect(tcp_server)})
        """,
        before="""
        import encodings.idna, json, os, socket
        import liberty.jobs.sandbox  # the interpreter's stdlib is out of reach for uid 65534 on this host
        os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
        """,
    )
    assert out.report["network"].applied, out.report["network"].detail
    assert "userns+netns" in out.report["network"].detail
    assert out.result == {"connect": {"ok": False, "error": "ConnectionRefusedError", "errno": 111}}
