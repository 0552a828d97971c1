//! Wiring: builds config, metrics, publisher, source, rebuild loop, proxy and admin, and runs the shutdown sequence.
