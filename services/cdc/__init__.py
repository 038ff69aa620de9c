"""Change data capture: sources for the cdc_history worker (`clickloop cdc ...`)."""
