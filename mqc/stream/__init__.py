"""Streaming a model from its shards: sources, the meta skeleton, the layer stack."""
