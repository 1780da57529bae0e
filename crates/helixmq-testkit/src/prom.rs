//! A strict reader of the Prometheus text exposition format (0.0.4) and of
//! OpenMetrics text (what prometheus-client writes): enough to prove a scrape
//! parses and to read values back, and to list the metric names an endpoint exposes.
#![allow(unreachable_pub)] // a helper of test binaries: `pub` for their test files, never exported

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's metric name (with `_total`, `_bucket`, ... suffixes).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Family name → type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    /// Every sample, in the order of the text.
    pub samples: Vec<Sample>,
}

const SUFFIXES: &[&str] = &[
    "", "_total", "_created", "_bucket", "_count", "_sum", "_info", "_gcount", "_gsum",
];

fn valid_name(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value '{s}': {e}")),
    }
}

/// Parse `{a="x",b="y"}` starting at `rest` (after the name); returns labels and the remainder.
fn parse_labels(rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(mut s) = rest.strip_prefix('{') else {
        return Ok((labels, rest));
    };
    loop {
        s = s.trim_start_matches(' ');
        if let Some(r) = s.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if !valid_name(key) {
            return Err(format!("bad label name '{key}'"));
        }
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("duplicate label '{key}'"));
        }
        s = &s[end + 1..];
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

/// Parse a whole exposition; every sample must belong to a family declared by `# TYPE`.
pub fn parse(text: &str) -> Result<Scrape, String> {
    let mut out = Scrape::default();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if eof {
            return Err(at("content after '# EOF'".into()));
        }
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("EOF") => eof = true,
                Some("TYPE") => {
                    let name = parts.next().ok_or_else(|| at("TYPE without name".into()))?;
                    let ty = parts.next().ok_or_else(|| at("TYPE without type".into()))?;
                    if !valid_name(name) {
                        return Err(at(format!("bad metric name '{name}'")));
                    }
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "untyped",
                        "unknown",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ];
                    if !known.contains(&ty) {
                        return Err(at(format!("unknown type '{ty}'")));
                    }
                    out.types.insert(name.to_string(), ty.to_string());
                }
                _ => {} // HELP, UNIT and plain comments
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at(format!("bad metric name '{name}'")));
        }
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(at)?;
        // OpenMetrics exemplars follow a '#'.
        let rest = rest.split(" # ").next().unwrap_or("");
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>()
                .map_err(|e| at(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        if family_of(&out.types, name).is_none() {
            return Err(at(format!("sample '{name}' has no '# TYPE' family")));
        }
        out.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

fn family_of<'a>(types: &'a BTreeMap<String, String>, sample: &str) -> Option<&'a str> {
    SUFFIXES.iter().find_map(|suf| {
        let fam = sample.strip_suffix(suf)?;
        types.get_key_value(fam).map(|(k, _)| k.as_str())
    })
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        match hits.as_slice() {
            [one] => Some(one.value),
            [] => None,
            many => panic!("{} samples match {name}{labels:?}: {many:?}", many.len()),
        }
    }

    /// Every name a query could use: sample names and family names.
    pub fn names(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .map(|s| s.name.clone())
            .chain(self.types.keys().cloned())
            .collect()
    }
}

#[test]
fn parser_rejects_garbage() {
    assert!(parse("# TYPE a counter\na_total 1\n# EOF\n").is_ok());
    assert!(parse("a_total 1\n").is_err(), "sample without TYPE");
    assert!(
        parse("# TYPE a counter\na_total one\n").is_err(),
        "bad value"
    );
    assert!(
        parse("# TYPE a counter\na_total{x=\"1} 1\n").is_err(),
        "unterminated label"
    );
    assert!(
        parse("# TYPE a counter\n# EOF\na_total 1\n").is_err(),
        "after EOF"
    );
    let s = parse("# TYPE q gauge\nq{queue=\"a\\\"b\",vhost=\"/\"} 3 1700000000\n").unwrap();
    assert_eq!(s.value("q", &[("queue", "a\"b")]), Some(3.0));
}
