"""DTLS 1.2 for ``dtls`` listeners, sans I/O: bytes in, datagrams out.

- ``server``: ``DtlsServer``, one per listener: the shared context and the
  stateless cookie exchange (HelloVerifyRequest) that must succeed before a
  source gets any state at all;
- ``session``: ``DtlsSession``, one per source whose cookie verified: the rest
  of the handshake, one message per application-data record, close_notify,
  and retransmission on the injected clock;
- ``client``: ``DtlsClient``, the other end (``gateway client dtls://`` and
  the bench's ``dtls://`` subscribers), on the same session code;
- ``cookies`` (the keyed cookies), ``records`` (DTLS record framing: what goes
  in one datagram) and ``context`` (the DTLS 1.2 profile).

Nothing here opens a socket or reads the time: the listener hands datagrams in
and sends what its ``SessionOwner.transmit`` is given.
"""
