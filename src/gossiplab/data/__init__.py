"""Real datasets, partitions over sites, and the federation that samples [N, B, ...] batches."""
