"""Data files shipped with the package (the aggregator prompt)."""
