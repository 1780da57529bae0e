//! The password never appears in Debug, Display, the redacted YAML or any error,
//! wherever it came from (file, RABBITMQ_PASSWORD, RABBITMQ_URL).

use helixmq::config::load_from_str;
use helixmq_testkit::config::{env, ok, problems};

const PW: &str = "Tr0ub4dor&3xyz";

fn assert_hidden(text: &str) {
    assert!(!text.contains(PW), "password leaked in: {text}");
    assert!(
        !text.contains("Tr0ub4dor"),
        "part of the password leaked in: {text}"
    );
}

#[test]
fn debug_display_and_yaml_hide_the_password_from_the_file() {
    let c = ok(&format!("rabbitmq:\n  password: \"{PW}\"\n"), &[]);
    assert_eq!(c.rabbitmq.password.expose(), PW);
    assert_hidden(&format!("{c:?}"));
    assert_hidden(&format!("{c:#?}"));
    assert_hidden(&c.to_string());
    assert_hidden(&c.to_redacted_yaml());
    assert_hidden(&format!("{}", c.rabbitmq.password));
    assert_hidden(&format!("{:?}", c.rabbitmq.password));
    assert!(c.to_redacted_yaml().contains("***"));
}

#[test]
fn password_from_environment_and_url_is_hidden() {
    let c = ok("", &[("RABBITMQ_PASSWORD", PW)]);
    assert_eq!(c.rabbitmq.password.expose(), PW);
    assert_hidden(&format!("{c:?}"));
    assert_hidden(&c.to_redacted_yaml());

    let c = ok(
        "",
        &[("RABBITMQ_URL", "amqp://app:Tr0ub4dor%263xyz@rabbit/")],
    );
    assert_eq!(c.rabbitmq.password.expose(), PW);
    assert_hidden(&format!("{c:?}"));
    assert_hidden(&c.to_redacted_yaml());
}

#[test]
fn bad_url_error_does_not_contain_the_password() {
    for url in [
        format!("http://app:{PW}@rabbit/"),
        format!("amqp://app:{PW}@rabbit:99999/"),
        format!("amqp://app:{PW}@rabbit/a/b"),
        format!("amqp://app:{PW}"),
        format!("amqp://app:{PW}@/"),
        format!("amqp://app:{PW}@rabbit/?x=1"),
        "amqp://app:Tr0ub4dor%263xyz@rabbit/,ftp://app:Tr0ub4dor%263xyz@b/".to_string(),
        format!("amqp://app:{PW}@rabbit/,amqp://app:other-pass@b/"),
    ] {
        let err = load_from_str("", &env(&[("RABBITMQ_URL", &url)])).unwrap_err();
        assert_hidden(&err.to_string());
        assert_hidden(&format!("{err:?}"));
    }
}

#[test]
fn password_problems_show_stars() {
    // A number where the password is expected: reported, value hidden.
    let ps = problems("rabbitmq:\n  password: 123456789\n", &[]);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert!(ps[0].starts_with("rabbitmq.password = `***`"), "{}", ps[0]);
    assert!(!ps[0].contains("123456789"), "{}", ps[0]);

    // An interpolation problem in the password: the raw value is hidden too.
    let ps = problems(&format!("rabbitmq:\n  password: \"{PW}${{\"\n"), &[]);
    assert!(
        ps[0].starts_with("rabbitmq.password = `***`: unterminated"),
        "{}",
        ps[0]
    );
    assert_hidden(&ps[0]);
}

#[test]
fn password_is_scrubbed_from_other_messages() {
    // Someone points another field at the password variable, and it is invalid there.
    let err = load_from_str(
        "rabbitmq:\n  host: ${RABBITMQ_PASSWORD}\n",
        &env(&[("RABBITMQ_PASSWORD", "pass word here")]),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("pass word here"), "{text}");
    assert!(text.contains("rabbitmq.host = `***`"), "{text}");
}

#[test]
fn yaml_syntax_error_does_not_quote_the_password() {
    let yaml = format!("rabbitmq:\n  password: {PW}\n  host: [unclosed\n");
    let err = load_from_str(&yaml, &env(&[])).unwrap_err();
    assert_hidden(&err.to_string());
    let yaml = format!("rabbitmq:\n  password: \"{PW}\n");
    let err = load_from_str(&yaml, &env(&[])).unwrap_err();
    assert_hidden(&err.to_string());
}

#[test]
fn errors_with_many_problems_keep_the_password_out() {
    let yaml = format!("rabbitmq:\n  password: \"{PW}\"\n  port: 0\n  prefetch_count: 0\n");
    let err = load_from_str(
        &yaml,
        &env(&[("RABBITMQ_URL", &format!("amqp://u:{PW}@h:0/"))]),
    )
    .unwrap_err();
    assert_hidden(&err.to_string());
}

#[test]
fn redacted_url_for_logs() {
    let c = ok(
        &format!("rabbitmq:\n  password: \"{PW}\"\n  username: \"a b\"\n"),
        &[],
    );
    assert_eq!(
        c.rabbitmq.redacted_url(),
        "amqp://a%20b:***@localhost:5672/%2F"
    );
    let c = ok(
        "",
        &[("RABBITMQ_URL", "amqps://u:Tr0ub4dor%263xyz@[::1]/prod")],
    );
    assert_eq!(c.rabbitmq.redacted_url(), "amqps://u:***@[::1]:5671/prod");
}
