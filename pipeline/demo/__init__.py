"""The built-in demo shop: procedural product photos, merchant titles and a click log."""
