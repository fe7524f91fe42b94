"""Thin async drivers that run the round machines (`fedlearn/machines/`) against the node."""
