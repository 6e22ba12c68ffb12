"""``twist gateway`` / ``twistd gateway``: options and the service, for Twisted's runners.

``twist gateway --config config.toml`` runs the same ``GatewayService`` as
``gateway --config``; Twisted's runner then owns logging (its own format), the
reactor and the signals for stopping; SIGHUP reloads the config as usual.
``[gateway] workers`` is not supported here (one process; use ``gateway``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from gateway.config.errors import ConfigError
from gateway.config.load import load
from gateway.config.settings import Config


class Options(usage.Options):
    """``--config PATH`` (default ``config.toml``)."""

    optParameters = [["config", "c", "config.toml", "the TOML config file to run"]]

    def postOptions(self) -> None:
        try:
            self.loaded: Config = load(Path(self["config"]))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.loaded.gateway.workers > 1:
            raise usage.UsageError(
                f"{self['config']}: gateway.workers: twist runs one process; "
                "run `gateway --config` for several workers"
            )


def makeService(options: Options) -> IService:
    """The gateway service; it listens when the runner starts it."""
    from twisted.internet import reactor

    from gateway.server import GatewayService

    service = GatewayService(options.loaded, reactor)
    running: Any = reactor
    signal.signal(signal.SIGHUP, lambda signum, frame: running.callFromThread(service.reload))
    return service
