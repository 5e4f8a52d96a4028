"""Readers and writers with geometry kept, dataset layouts, preprocessing, slice cache, splits."""
