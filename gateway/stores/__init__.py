"""Where history lives beyond the process's memory (``[history] store``).

``sqlite`` (the file's tables, read and written on a thread of their own) and
``durable`` (``DurableHistory``: the reactor side, which persists what the memory
logs of ``gateway.core.history`` record, batched and bounded, and gives them back
on start). The memory logs stay the numbering authority and what recovery reads.
"""
