"""Ground floor with no ML semantics: the strict config loader, the registry, distributed helpers, checkpoints,
logging and process utilities. It imports nothing else of the project."""
