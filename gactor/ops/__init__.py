"""Running gactor as a service: metrics and health over HTTP, the TOML configuration,
structured logs and systemd's readiness protocol.

Nothing here owns containers or talks to the kernel: the metrics collector asks the
registry actor for its census at scrape time and reads the cgroups of what it lists.
"""
