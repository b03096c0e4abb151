"""The websocket listener: one Autobahn factory, two kinds of session (devices and applications).

The wire protocol is documented in docs/protocol.md.
"""
