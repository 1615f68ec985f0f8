"""lctx.bench."""
