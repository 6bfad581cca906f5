"""Steps every task model shares: config sections merged over their defaults and the backbone built for a
head layout (``assembly``), images normalized and padded into one batch (``batching``)."""
