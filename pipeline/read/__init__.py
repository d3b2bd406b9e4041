"""Reading feature stores back: the torch ``Dataset`` over a store (:mod:`.dataset`), its shard-aware sampler
(:mod:`.sampler`) and collate (:mod:`.collate`), what a store offers a reader (:mod:`.store_info`), features
produced on read (:mod:`.on_read`, :mod:`.implicit_function`) and the Ray Data source (:mod:`.ray_source`)."""
