"""Data layer: dataset adapters -> canonical samples -> rendered ids/labels -> collated batches."""
