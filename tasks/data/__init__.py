"""What every task reads: image decoding and resizing (``images``), COCO annotation files as compact
tables (``coco``), dataset checks (``check``) and the synthetic shapes dataset (``synthetic``)."""
