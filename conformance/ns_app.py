"""A pod's app for the eBPF capture tests: HTTP on [::]:PORT (IPv4 and IPv6), one JSON line per
request in LOG with the path, the peer and the XFCC header it saw."""

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
LOG = sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without NODELAY, Nagle and the peer's delayed ACK
    # add 40 ms to every response.
    disable_nagle_algorithm = True

    def do_GET(self):
        seen = {"path": self.path, "peer": self.client_address[0], "xfcc": self.headers.get("x-forwarded-client-cert")}
        with open(LOG, "a") as f:
            f.write(json.dumps(seen) + "\n")
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


Server(("::", PORT), Handler).serve_forever()
