"""Transports: one shared peer lifecycle (``lifecycle``) and listener service
(``listening``), then each transport's own framing and handshakes: ``line``
(tcp, tls), ``datagram`` (udp), ``websocket`` (ws, wss). ``registry`` maps a
listener type to its builder."""
