//! Which dead letters a page or an action applies to.

use std::time::Duration;

use super::letter::DeadLetter;

/// A selection of dead letters. Every field narrows it; the default selects all.
///
/// The same filter drives a page, a group, and an action ("replay everything
/// matching"), so what an operator sees is what an action touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only these message ids (every copy of each).
    pub ids: Vec<String>,
    /// Only letters that failed in this queue (full name).
    pub origin_queue: Option<String>,
    /// Only letters whose reason contains this text (case-insensitive).
    pub reason: Option<String>,
    /// Only letters of this failure group (see [`DeadLetter::group`]).
    pub group: Option<String>,
    /// Only this application type (`llm.request`).
    pub kind: Option<String>,
    /// Only letters with this header set to this value (compared as text).
    pub header: Option<(String, String)>,
    /// Only letters whose last failure is at least this old.
    pub min_age: Option<Duration>,
    /// Only letters whose last failure is at most this old.
    pub max_age: Option<Duration>,
    /// Only letters run at least this many times.
    pub min_attempts: Option<u32>,
    /// Only letters run at most this many times.
    pub max_attempts: Option<u32>,
    /// Only letters whose payload contains this text (case-insensitive).
    pub search: Option<String>,
}

impl Filter {
    /// Everything.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Whether it selects everything.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// The filter with its texts lower-cased once, for matching many letters.
    pub(crate) fn prepared(&self) -> Prepared<'_> {
        Prepared {
            f: self,
            reason: self.reason.as_ref().map(|r| r.to_lowercase()),
            search: self.search.as_ref().map(|r| r.to_lowercase()),
            now_ms: crate::message::now_unix_millis(),
        }
    }

    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.prepared().matches(letter)
    }
}

/// A filter ready to match many letters.
pub(crate) struct Prepared<'a> {
    f: &'a Filter,
    reason: Option<String>,
    search: Option<String>,
    now_ms: i64,
}

impl Prepared<'_> {
    pub(crate) fn matches(&self, l: &DeadLetter) -> bool {
        let f = self.f;
        let some_eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_deref() == Some(w))
        };
        let age = || Duration::from_millis(l.age_ms(self.now_ms) as u64);
        (f.ids.is_empty() || f.ids.contains(&l.id))
            && some_eq(&f.origin_queue, &l.origin_queue)
            && some_eq(&f.kind, &l.kind)
            && f.group.as_ref().is_none_or(|g| *g == l.group)
            && self.reason.as_ref().is_none_or(|r| l.reason_lc.contains(r))
            && self
                .search
                .as_ref()
                .is_none_or(|s| l.payload_lc.as_ref().is_some_and(|p| p.contains(s)))
            && f.header
                .as_ref()
                .is_none_or(|(k, v)| l.headers.get(k).is_some_and(|h| h == v))
            && f.min_attempts.is_none_or(|n| l.attempts >= n)
            && f.max_attempts.is_none_or(|n| l.attempts <= n)
            && f.min_age.is_none_or(|a| age() >= a)
            && f.max_age.is_none_or(|a| age() <= a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{header, Message};
    use std::sync::Arc;

    fn letter(reason: &str, queue: &str, payload: &str, attempts: u32) -> DeadLetter {
        let mut m = Message::new(payload.to_string())
            .with_header(header::DEAD_LETTER_REASON, reason)
            .with_header(header::ORIGIN_QUEUE, queue)
            .with_header("tenant", "acme")
            .with_kind("llm.request");
        m.attempt = attempts;
        DeadLetter::from_message(Arc::new(m), false)
    }

    #[test]
    fn every_field_narrows() {
        let l = letter(
            "Provider TIMEOUT after 30s",
            "p.tasks.llm",
            r#"{"model":"gpt"}"#,
            3,
        );
        assert!(Filter::all().matches(&l));
        let f = |f: Filter| f.matches(&l);
        assert!(f(Filter {
            reason: Some("timeout".into()),
            ..Filter::all()
        }));
        assert!(!f(Filter {
            reason: Some("refused".into()),
            ..Filter::all()
        }));
        assert!(f(Filter {
            origin_queue: Some("p.tasks.llm".into()),
            ..Filter::all()
        }));
        assert!(!f(Filter {
            origin_queue: Some("p.tasks.debate".into()),
            ..Filter::all()
        }));
        assert!(f(Filter {
            search: Some("GPT".into()),
            ..Filter::all()
        }));
        assert!(!f(Filter {
            search: Some("claude".into()),
            ..Filter::all()
        }));
        assert!(f(Filter {
            header: Some(("tenant".into(), "acme".into())),
            ..Filter::all()
        }));
        assert!(!f(Filter {
            header: Some(("tenant".into(), "other".into())),
            ..Filter::all()
        }));
        assert!(f(Filter {
            kind: Some("llm.request".into()),
            ..Filter::all()
        }));
        assert!(f(Filter {
            min_attempts: Some(3),
            max_attempts: Some(3),
            ..Filter::all()
        }));
        assert!(!f(Filter {
            min_attempts: Some(4),
            ..Filter::all()
        }));
        assert!(f(Filter {
            group: Some("Provider TIMEOUT after #s".into()),
            ..Filter::all()
        }));
        assert!(f(Filter {
            max_age: Some(Duration::from_secs(3600)),
            ..Filter::all()
        }));
        assert!(!f(Filter {
            min_age: Some(Duration::from_secs(3600)),
            ..Filter::all()
        }));
        assert!(f(Filter {
            ids: vec![l.id.clone()],
            ..Filter::all()
        }));
        assert!(!f(Filter {
            ids: vec!["nope".into()],
            ..Filter::all()
        }));
    }
}
