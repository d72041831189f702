"""Measurement scripts and the research tooling they share (the scale ladder, the policy builder); not installed:
run from the checkout's root (``python benchmarks/<script>.py`` or ``python -m benchmarks.<module>``)."""
