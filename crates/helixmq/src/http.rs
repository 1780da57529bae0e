//! `/metrics` and `/health` as an axum router services can mount (filled in by observability work).
