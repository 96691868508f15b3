"""Block-wise progressive training for memory-limited clients ("Bridging Memory Gaps", NeuLite): blocks and stages,
the nHSIC curriculum loss, the training harmonizer and memory-aware scheduling."""
