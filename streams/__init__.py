"""clickloop's stream processors: Faust agents over pure, synchronous domain logic.

`PROCESSORS` names them; each is the module `streams.<name>` (its `build`), imported
only by the worker that runs it (streams/app.py). Kept here, free of imports, so the
CLI lists them without loading Faust."""

PROCESSORS = ("sessionize", "features", "archive", "cdc_history", "attribution", "bandits")
CDC_PROCESSORS = ("cdc_history",)   # started by `clickloop up` only with CDC enabled
