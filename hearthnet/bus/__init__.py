"""Capability bus and WebSocket transport: how requests and bytes move between nodes."""
