//! `${VAR}` interpolation over a parsed TOML tree.
//!
//! Interpolating after parsing (not on the raw text) means a secret containing quotes
//! or newlines cannot break the file's syntax, and an error can name the key it is in.
//! Supports `${VAR}`, `${VAR:-default}` and `$$` for a literal `$`.

use toml::Value;

use super::ConfigError;

/// Replaces `${…}` in every string of `value`, in place. `lookup` reads the environment.
pub fn interpolate(
    value: &mut Value,
    path: &mut Vec<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(s) if s.contains('$') => {
            *s = expand(s, lookup).map_err(|message| ConfigError::invalid(key_of(path), message))?;
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                interpolate(item, path, lookup)?;
                path.pop();
            }
        }
        Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                path.push(k.clone());
                interpolate(item, path, lookup)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// `["routes", "[0]", "prefix"]` → `routes[0].prefix`, the form serde errors use too.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for seg in path {
        if !key.is_empty() && !seg.starts_with('[') {
            key.push('.');
        }
        key.push_str(seg);
    }
    key
}

fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or_else(|| "unclosed `${` in value".to_string())?;
            let expr = &tail[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{expr}}}` is not a valid variable reference"));
            }
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(format!("environment variable {name} is not set")),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr\"et".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        assert_eq!(expand("Bearer ${TOKEN}", &env).as_deref(), Ok("Bearer s3cr\"et"));
        assert_eq!(expand("${MISSING:-fallback}", &env).as_deref(), Ok("fallback"));
        assert_eq!(expand("${EMPTY:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(expand("cost $$5 and $", &env).as_deref(), Ok("cost $5 and $"));
        assert_eq!(expand("no vars", &env).as_deref(), Ok("no vars"));
    }

    #[test]
    fn reports_missing_and_malformed_references() {
        assert_eq!(
            expand("${MISSING}", &env),
            Err("environment variable MISSING is not set".to_string())
        );
        assert!(expand("${UNCLOSED", &env).is_err());
        assert!(expand("${bad-name}", &env).is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let mut v: Value = toml::from_str("[upstream]\nheaders = { auth = \"${NOPE}\" }\n").expect("toml");
        let err = interpolate(&mut v, &mut Vec::new(), &env).expect_err("missing var");
        assert_eq!(
            err.to_string(),
            "config key `upstream.headers.auth`: environment variable NOPE is not set"
        );
        let mut v: Value = toml::from_str("[[routes]]\nprefix = \"${NOPE}\"\n").expect("toml");
        let err = interpolate(&mut v, &mut Vec::new(), &env).expect_err("missing var");
        assert!(err.to_string().starts_with("config key `routes[0].prefix`"), "{err}");
    }
}
