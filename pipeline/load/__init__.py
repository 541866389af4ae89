"""[1] Loaders (torchvision baseline, FFCV, DALI): decode each image once, cut every crop, yield uint8 ``Batch``es."""
