"""The cluster: several gateway nodes joined by a Redis backplane (``backplane``, ``wire``)."""
