"""Live migration: one engine (precopy rounds over a dirty log, convergence,
switch-over, device state) and one stream format for every kind of guest."""
