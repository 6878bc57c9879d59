"""Audio files and MUSDB-style folders → WebDataset shards with a manifest (``shard``, ``verify``, ``demo``)."""
