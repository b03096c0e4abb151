"""The websocket listener: one lean RFC 6455 server (server.py, frames.py), two kinds of session (devices and applications).

The wire protocol is documented in docs/protocol.md.
"""
