"""lctx.model."""
