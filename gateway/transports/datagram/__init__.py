"""Datagram transports: the ``udp`` listener (``server``) and its wire rules (``wire``)."""
