"""lctx.training."""
