"""Reading feature stores back: the torch ``Dataset`` over one or more stores, its shard-aware sampler and collate
(:mod:`.dataset`)."""
