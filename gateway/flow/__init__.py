"""Flow control: what keeps one peer from costing the others memory or time.

- ``backlog``: per receiver, what may wait beyond its transport's buffer, and
  the slow-consumer policy (``Backlog``, ``WriteThrough``);
- ``backpressure``: gateway-wide, the total waiting (``Backpressure``);
- ``caps``: message rate (``TokenBucket``) and connection caps (``ConnectionGate``);
- ``connection``: all of it for one stream connection (``ConnectionFlow``), and
  what every connection shares (``Governor``);
- ``ratelog``: warnings at most once a second per cause (``RateLimitedLog``).
"""
