"""The recommender: ranked items for a visitor, from features in Redis."""
