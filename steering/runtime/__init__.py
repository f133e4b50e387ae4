"""What a method's in-engine adapter is built from: per-row batch state (`rows`), the telemetry
channel to the API process (`telemetry`), the steerable decoder layers (`layers`), one engine
step's layout for layer work (`step`) and the `extra_args` keys (`keys`). No method lives here,
and nothing here imports one."""
