//! Deployment: the shipped files, a node booted with the deployment
//! configuration, the metrics the dashboards and alerts rely on, and the
//! `/metrics` and `/health` endpoints.

mod boot;
mod files;
mod http_metrics;
mod metrics;
