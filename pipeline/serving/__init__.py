"""Serving: the champion's catalog vectors in an approximate-nearest-neighbour index, and the
pointer saying which model version and which index serve."""
