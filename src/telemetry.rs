//! Logging setup (json | text) and the access-log line.
