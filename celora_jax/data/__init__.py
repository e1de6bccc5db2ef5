"""Data loading, client partitions and fixed-shape packing."""
