"""gRPC through the sidecar pair with Python grpcio: unary, bidi streaming, a 4 MiB message,
and a non-OK status with trailers. The upstream sees the caller's SPIFFE ID in XFCC."""

from concurrent import futures

import grpc
import pytest

from conftest import CLIENT_ID, Mesh, free_port

OPTS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]


def _identity(b):
    return b


def _xfcc(context):
    return dict(context.invocation_metadata()).get("x-forwarded-client-cert", "")


def unary(request, context):
    if request == b"fail":
        context.set_trailing_metadata((("x-reason", "no-such-order"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "order 42 not found")
    return _xfcc(context).encode() + b"|" + request


def bidi(request_iterator, context):
    for i, msg in enumerate(request_iterator):
        yield f"{i}:".encode() + msg


@pytest.fixture
def grpc_mesh(tmp_path):
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTS)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("eastguard.test.Echo", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    mesh = Mesh(tmp_path, port).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.outbound_port}", options=OPTS + [("grpc.default_authority", "server")])
    yield mesh, channel
    channel.close()
    mesh.stop()
    server.stop(0)


def call_unary(channel, payload, timeout=10):
    return channel.unary_unary("/eastguard.test.Echo/Unary", _identity, _identity)(payload, timeout=timeout)


def test_unary_carries_caller_identity(grpc_mesh):
    _, channel = grpc_mesh
    reply = call_unary(channel, b"hello")
    xfcc, _, echoed = reply.partition(b"|")
    assert echoed == b"hello"
    assert f"URI={CLIENT_ID}".encode() in xfcc


def test_bidi_streaming(grpc_mesh):
    _, channel = grpc_mesh
    stub = channel.stream_stream("/eastguard.test.Echo/Bidi", _identity, _identity)
    replies = list(stub(iter([b"a", b"b", b"c", b"d", b"e"]), timeout=10))
    assert replies == [b"0:a", b"1:b", b"2:c", b"3:d", b"4:e"]


def test_four_mib_message_both_ways(grpc_mesh):
    _, channel = grpc_mesh
    payload = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
    reply = call_unary(channel, payload, timeout=30)
    assert reply.partition(b"|")[2] == payload


def test_non_ok_status_with_trailers(grpc_mesh):
    mesh, channel = grpc_mesh
    with pytest.raises(grpc.RpcError) as err:
        call_unary(channel, b"fail")
    e = err.value
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details() == "order 42 not found"
    assert ("x-reason", "no-such-order") in tuple(e.trailing_metadata())
    # The status reached the Istio metrics of both sidecars.
    import time
    import urllib.request

    for _ in range(50):
        text = urllib.request.urlopen(mesh.client.admin("/stats/prometheus")).read().decode()
        if 'grpc_response_status="5"' in text:
            break
        time.sleep(0.1)
    assert 'grpc_response_status="5"' in text and 'request_protocol="grpc"' in text
