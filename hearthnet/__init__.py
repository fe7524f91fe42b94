"""hearthnet: a peer-to-peer node daemon for community networks."""

__version__ = "0.1.0"
