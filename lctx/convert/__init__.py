"""lctx.convert."""
