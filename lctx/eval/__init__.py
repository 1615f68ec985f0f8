"""lctx.eval."""
