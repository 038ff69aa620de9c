"""`clickloop replay`: re-feed a topic range (from Kafka or the Parquet archive) for backfills."""
