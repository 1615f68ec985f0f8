"""lctx.parallel."""
