"""Operations: the admin site (``admin``), Prometheus metrics (``metrics``), log output (``logs``), worker processes (``workers``, ``supervisor``)."""
