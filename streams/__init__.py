"""clickloop's stream processors: Faust agents over pure, synchronous domain logic."""
