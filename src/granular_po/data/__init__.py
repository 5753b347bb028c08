"""Data layer: records -> validated pairs -> exact per-token weights -> padded batches."""
