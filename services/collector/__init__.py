"""The collector: a Segment-compatible tracking API that produces to `clicks`."""
