"""lctx.infer."""
