"""Retrieval parts: ranking metrics and the paired bootstrap, exact and HNSW search, BM25, slices."""
