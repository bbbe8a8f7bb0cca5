#!/usr/bin/python3
"""Serves DIR over HTTPS on 127.0.0.1 (a free port) with CERT and KEY; prints the port.

Usage: serve.py DIR CERT KEY
"""
import functools
import http.server
import ssl
import sys

root, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
