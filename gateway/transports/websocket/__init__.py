"""WebSocket transports (``ws``, ``wss``): sans-I/O frames and JSON envelopes, the origin policy, presence, the peer, and the site."""
