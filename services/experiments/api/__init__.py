"""The experiments service: the I/O shell (aiohttp, aiokafka) around the pure
modules of services.experiments (which the purity test keeps free of I/O):
`store` (registry and snapshots from Kafka, the write path), `app` (HTTP API
and dashboard), `openapi`, `metrics`, and `static/` (the dashboard)."""
