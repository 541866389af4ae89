"""[0] One-time conversion: scan an ImageFolder, write the FFCV ``.beton`` and the DALI shards, keep a manifest."""
