"""The HTTP connector: httpx.AsyncClient under trio against a local echo server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import sniffio
import trio

from liberty.jobs.connectors import ConnectorRegistry, ConnectorSession, HttpConfig, load_connectors
from liberty.jobs.protocol.values import encode_exception

pytestmark = pytest.mark.trio


def api(base_url: str, **changes: Any) -> dict[str, HttpConfig]:
    cfg = HttpConfig(name="api", base_url=base_url, headers={"Accept": "application/json"}, **changes)
    return {"api": cfg}


def body(response: dict[str, Any]) -> Any:
    return json.loads(response["text"])


async def test_get_with_params_returns_status_headers_and_text(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server + "/v1/")) as reg, reg.session("s", ["api"]) as s:
        response = await s.call("api", "get", ["releases"], {"params": {"page": 2, "tag": ["a", "b"]}})
    assert sniffio.current_async_library() == "trio"
    assert response["status_code"] == 200 and response["headers"]["x-echo"] == "yes"
    echo = body(response)
    assert echo["method"] == "GET" and echo["path"] == "/v1/releases"
    assert echo["query"] == {"page": ["2"], "tag": ["a", "b"]}
    assert echo["headers"]["accept"] == "application/json"


async def test_secret_headers_from_the_environment_reach_the_server(http_server: str, tmp_path: Path) -> None:
    path = tmp_path / "connectors.toml"
    path.write_text(
        f'[api]\ntype = "http"\nbase_url = "{http_server}"\ntoken_env = "API_TOKEN"\n'
        'headers_env = { "X-Api-Key" = "API_KEY" }\n'
    )
    configs = load_connectors(path, environ={"API_TOKEN": "tok-123", "API_KEY": "key-456"})
    async with ConnectorRegistry(configs) as reg, reg.session("s", ["api"]) as s:
        echo = body(await s.call("api", "get", ["/whoami"], {}))
    assert echo["headers"]["authorization"] == "Bearer tok-123" and echo["headers"]["x-api-key"] == "key-456"


async def test_post_sends_json_and_per_call_headers(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        response = await s.call("api", "post", ["/items"], {"json": {"name": "x", "n": [1, 2]}, "headers": {"X-Trace": "t1"}})
    echo = body(response)
    assert response["status_code"] == 201 and json.loads(echo["body"]) == {"name": "x", "n": [1, 2]}
    assert echo["headers"]["x-trace"] == "t1" and echo["headers"]["content-type"] == "application/json"


@pytest.mark.parametrize("verb", ["put", "patch", "delete"])
async def test_other_verbs_use_their_method(http_server: str, verb: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        assert body(await s.call("api", verb, ["/items/1"], {}))["method"] == verb.upper()


async def test_request_takes_the_method_first(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        echo = body(await s.call("api", "request", ["PATCH", "/x"], {"content": "raw"}))
    assert (echo["method"], echo["body"]) == ("PATCH", "raw")


@pytest.mark.parametrize("path", ["http://127.0.0.2:1/steal", "https://evil.example/x", "//evil.example/x"])
async def test_a_path_that_leaves_base_url_is_refused(http_server: str, path: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        with pytest.raises(ValueError, match="not a path relative to"):
            await s.call("api", "get", [path], {})


async def test_redirects_are_not_followed(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        response = await s.call("api", "get", ["/redirect"], {})
    assert response["status_code"] == 302 and response["headers"]["location"] == "http://127.0.0.2:1/stolen"


async def test_an_oversized_response_is_refused_with_the_knob_to_turn(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server, max_response_bytes=64 * 1024)) as reg, reg.session("s", ["api"]) as s:
        with pytest.raises(ValueError, match="more than 64 KiB.*max_response_kb"):
            await s.call("api", "get", ["/big"], {})


async def test_a_slow_server_hits_the_call_timeout(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server, call_timeout_seconds=0.5)) as reg, reg.session("s", ["api"]) as s:
        with pytest.raises(TimeoutError, match=r"connector 'api': get did not finish within 0.5 s"):
            await s.call("api", "get", ["/slow"], {})


async def test_a_transport_error_keeps_its_type_but_not_the_request_and_its_headers() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    configs = {"api": HttpConfig(name="api", base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer hush-hush"})}
    async with ConnectorRegistry(configs) as reg, reg.session("s", ["api"]) as s:
        with pytest.raises(httpx.ConnectError) as info:
            await s.call("api", "get", ["/x"], {})
    assert "connector 'api': GET /x" in str(info.value)
    with pytest.raises(RuntimeError):
        info.value.request  # noqa: B018 - the request (with its headers) was dropped
    encoded = encode_exception(info.value)
    assert encoded["pickle"] and "hush-hush" not in json.dumps(encoded)
    import base64

    assert b"hush-hush" not in base64.b64decode(encoded["pickle"])


async def test_bad_http_calls_are_explained(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        with pytest.raises(TypeError, match="unexpected keyword argument.*files.*accepted: params, json"):
            await s.call("api", "get", ["/x"], {"files": {}})
        with pytest.raises(TypeError, match="exactly one path"):
            await s.call("api", "get", [], {})
        with pytest.raises(AttributeError, match="has no method 'head'; valid: get, post"):
            await s.call("api", "head", ["/x"], {})
        with pytest.raises(ValueError, match="not an HTTP method"):
            await s.call("api", "request", ["GET /x", "/"], {})


async def test_leaving_the_registry_closes_the_client(http_server: str) -> None:
    async with ConnectorRegistry(api(http_server)) as reg:
        session: ConnectorSession
        async with reg.session("s", ["api"]) as session:
            await session.call("api", "get", ["/x"], {})
        client = (await reg.backend("api")).client  # type: ignore[union-attr]
        assert client is not None and not client.is_closed
    assert client.is_closed


async def test_many_concurrent_requests_run_on_trio(http_server: str) -> None:
    statuses: list[int] = []
    async with ConnectorRegistry(api(http_server)) as reg, reg.session("s", ["api"]) as s:
        async with trio.open_nursery() as nursery:
            for i in range(20):

                async def one(i: int = i) -> None:
                    statuses.append((await s.call("api", "get", [f"/n/{i}"], {}))["status_code"])

                nursery.start_soon(one)
    assert statuses == [200] * 20
