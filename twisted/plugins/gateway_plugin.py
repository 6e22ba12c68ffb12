"""``twist gateway --config config.toml``: the gateway as a Twisted application plugin.

This folder has no ``__init__.py`` on purpose: Twisted's own ``twisted.plugins``
package finds this file (see the Twisted plugin howto).
"""

from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "gateway",
    "gateway.cli.tap",
    "Multi-protocol broadcast gateway: TCP, TLS, UDP and WebSocket peers on one bus",
    "gateway",
)
