"""The core: what travels (``message``), the bus that relays it (``bus``), the interfaces
between the bus and the transports (``interfaces``) and the counters (``metrics``).

Nothing here imports a transport.
"""
