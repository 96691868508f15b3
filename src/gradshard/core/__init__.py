"""Pure building blocks, no I/O: model layouts, chunk digests, shard partitions, the layout zoo, reduction kernels."""
