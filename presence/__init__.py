"""Presence: devices report whether their owner is online; granted applications hear it live."""

__version__ = "0.1.0"
