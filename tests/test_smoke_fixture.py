from socksflow.protocol import Reply
from socksflow.testing import socks5_handshake


def test_fixture_connect(socksflow_server):
    import socket
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    server = socksflow_server()
    code, client = socks5_handshake(server.address, f"127.0.0.1:{port}")
    assert code == Reply.SUCCEEDED
    peer, _ = srv.accept()
    client.sock.sendall(b"ping")
    assert peer.recv(4) == b"ping"
    peer.sendall(b"pong")
    assert client.recv_exactly(4) == b"pong"
    client.close(); peer.close(); srv.close()
