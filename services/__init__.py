"""clickloop's HTTP services (collector, recommender), its CLI and local infrastructure."""
