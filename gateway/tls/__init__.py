"""TLS: listener certificate material (``files``), server contexts (``server``), client
options (``client``) and the development PKI (``pki``, ``devcerts``)."""
