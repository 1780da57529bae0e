//! Capped, jittered exponential backoff, shared by reconnects and held re-routes.

use std::time::Duration;

use rand::Rng;

/// The delay before attempt `attempt` (1-based): `base × 2^(attempt-1)`, capped at
/// `cap`, then jittered into [½, 1] of that so that many clients failing at once
/// do not try again in lock-step.
pub(crate) fn jittered(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16));
    let d = exp.min(cap);
    let jitter = rand::rng().random_range(0.5..=1.0);
    d.mul_f64(jitter)
}
