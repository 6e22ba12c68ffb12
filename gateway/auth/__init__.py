"""Who a peer is and what it may do: roles and their permissions (``roles``)."""
