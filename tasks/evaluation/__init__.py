"""How predictions are scored and reported: COCO metrics through pycocotools or faster-coco-eval
(``coco``), mIoU (``miou``), per-category tables and pictures of runs and curves (``reports``)."""
