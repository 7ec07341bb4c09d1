"""clickclip: retrain CLIP image-text search models on e-commerce click logs."""

__version__ = "0.1.0"
