"""Data: the H&M contract, the synthetic generator, ingestion, validation, the warehouse."""
