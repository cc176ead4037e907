"""The data contract: dataset layout, Parquet schemas, atomic writes, hashing, media I/O."""
