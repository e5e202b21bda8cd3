"""Exports of compressed models to formats other tools load (dtm.export.compressed_tensors)."""
