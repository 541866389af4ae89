"""Cross-cutting runtime pieces with no ML semantics: config, distributed helpers, checkpoints, logging."""
