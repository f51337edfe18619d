//! Hiding the password in a PostgreSQL connection string before it goes into a message,
//! a log line or `Debug` output.
//!
//! Both forms tokio-postgres accepts are covered: URLs (password in the userinfo and/or
//! the query string) and key/value strings (`password = 'it''s'`, spaces around `=`,
//! quoted values with spaces). Any key ending in `password` (e.g. `sslpassword`) is
//! masked. It never fails: text it cannot make sense of is returned with every
//! `password=` value it can find masked. It does not validate the string.

/// Replaces every password in a connection string with `***`.
pub fn mask_url(url: &str) -> String {
    // The same test tokio-postgres uses to choose the URL form: a prefix, not a `://`
    // anywhere (a key/value string may hold one in a value and still carry a password).
    let url_form = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| url.strip_prefix(p).map(|rest| (&url[..p.len()], rest)));
    match url_form {
        Some((head, rest)) => format!("{head}{}", mask_values(&mask_userinfo(rest), true)),
        None => {
            let kv = mask_values(url, false);
            // Not a URL to tokio-postgres; text shaped like one (a mistyped scheme) may
            // still hold credentials, so they are hidden too.
            match kv.find("://") {
                Some(i) => {
                    let (head, rest) = kv.split_at(i + 3);
                    format!("{head}{}", mask_userinfo(rest))
                }
                None => kv,
            }
        }
    }
}

/// After the scheme: tokio-postgres takes everything up to the first `@` as the
/// credentials (not only the authority), so that is what must be hidden.
fn mask_userinfo(rest: &str) -> String {
    match rest.find('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}:***{}", &rest[..colon], &rest[at..]),
            None => rest.to_string(),
        },
        None => rest.to_string(),
    }
}

/// Masks the value after each `…password =`. In a URL query a value ends at `&` or `#`;
/// in a key/value string at whitespace, or at the closing quote of a quoted value.
fn mask_values(s: &str, url: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = find_ascii_ci(rest, "password") {
        let key_end = i + "password".len();
        out.push_str(&rest[..key_end]);
        let after = &rest[key_end..];
        let spaced = if url { after } else { after.trim_start() };
        let Some(value) = spaced.strip_prefix('=') else {
            rest = after;
            continue;
        };
        let value = if url { value } else { value.trim_start() };
        out.push_str("=***");
        rest = &value[value_end(value, url)..];
    }
    out.push_str(rest);
    out
}

fn value_end(v: &str, url: bool) -> usize {
    if url {
        return v.find(['&', '#']).unwrap_or(v.len());
    }
    if let Some(quoted) = v.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return i + 2,
                _ => {}
            }
        }
        return v.len();
    }
    v.find(char::is_whitespace).unwrap_or(v.len())
}

fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    hay.as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn masks_passwords_in_every_url_form() {
        assert_eq!(mask_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(mask_url("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(
            mask_url("postgres://h/db?user=u&password=secret"),
            "postgres://h/db?user=u&password=***"
        );
        assert_eq!(
            mask_url("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(mask_url("postgres://u:p%40ss@h/db"), "postgres://u:***@h/db");
    }

    /// Both found by the config-loader fuzz target.
    #[test]
    fn masks_spaced_quoted_and_doubled_passwords() {
        assert_eq!(
            mask_url("host=h user=u password = hunter22 x=1"),
            "host=h user=u password=*** x=1"
        );
        assert_eq!(mask_url("password='it\\'s a secret' host=h"), "password=*** host=h");
        assert_eq!(
            mask_url("postgres://u:first1@h/db?password=second2&sslmode=disable"),
            "postgres://u:***@h/db?password=***&sslmode=disable"
        );
        // A `://` inside a key/value string does not make it a URL (tokio-postgres looks
        // at the prefix only): found by the fuzz target too.
        assert_eq!(
            mask_url("host=h password = hunter44 dbname=x{DATABASE_URL:-postgres://localhost/k}"),
            "host=h password=*** dbname=x{DATABASE_URL:-postgres://localhost/k}"
        );
        assert_eq!(mask_url("postgress://u:typo1@h/db"), "postgress://u:***@h/db");
        assert_eq!(
            mask_url("host=h sslpassword=k PASSWORD=p"),
            "host=h sslpassword=*** PASSWORD=***"
        );
        for s in [
            "host=h password = hunter22",
            "postgres://u:first1@h/db?password=second2",
            "password='a b c' host=h",
        ] {
            let m = mask_url(s);
            for secret in ["hunter22", "first1", "second2", "a b c"] {
                assert!(!m.contains(secret), "{s} → {m}");
            }
        }
        assert_eq!(
            mask_url("host=h password"),
            "host=h password",
            "no value, nothing to hide"
        );
    }
}
