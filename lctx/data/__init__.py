"""lctx.data."""
