//! The rebuild loop shared by every source: change notifications → debounce (about 100 ms
//! holdoff, forced by 500 ms) → translate → publish, plus diagnostics reporting (log, gauge,
//! and a hook for the controller's Events/status). May import: translate, publish, metrics, tokio.
