"""The recall report, rendered from evaluate's summary alone (no torch, FAISS or open_clip needed)."""
