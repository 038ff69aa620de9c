"""Training the recommender's model: transform, split, metrics, ALS and the artifact (pure parts)."""
