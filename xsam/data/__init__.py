"""The data plane: registry, unified sample schema, source-format readers, shard writing and reading."""
