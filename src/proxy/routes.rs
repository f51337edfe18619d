//! Scope requirements by route: which scopes a request's path and method need.

use http::Method;

use crate::config::RouteRule;

pub struct Routes {
    /// Longest prefix first, so the first match is the most specific.
    rules: Vec<RouteRule>,
}

impl Routes {
    pub fn new(mut rules: Vec<RouteRule>) -> Self {
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Routes { rules }
    }

    /// The scopes required for `method path`; empty when no rule matches.
    pub fn required(&self, method: &Method, path: &str) -> &[String] {
        self.rules
            .iter()
            .find(|r| prefix_matches(&r.prefix, path) && (r.methods.is_empty() || r.methods.contains(method)))
            .map_or(&[], |r| r.scopes.as_slice())
    }
}

/// Segment-aware: `/v1/chat` matches `/v1/chat` and `/v1/chat/completions`, not `/v1/chatty`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Whether `granted` covers every scope in `required`.
pub fn covers<G: AsRef<str>>(granted: &[G], required: &[String]) -> bool {
    required.iter().all(|r| granted.iter().any(|g| g.as_ref() == r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, methods: &[Method], scopes: &[&str]) -> RouteRule {
        RouteRule {
            prefix: prefix.into(),
            methods: methods.to_vec(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn longest_prefix_and_method_decide() {
        let r = Routes::new(vec![
            rule("/v1", &[], &["read"]),
            rule("/v1/chat", &[Method::POST], &["chat"]),
            rule("/admin/", &[], &["admin"]),
        ]);
        assert_eq!(r.required(&Method::POST, "/v1/chat/completions"), ["chat"]);
        assert_eq!(r.required(&Method::GET, "/v1/chat/completions"), ["read"]);
        assert_eq!(r.required(&Method::POST, "/v1/chatty"), ["read"]);
        assert_eq!(r.required(&Method::GET, "/admin/users"), ["admin"]);
        assert!(r.required(&Method::GET, "/admin").is_empty());
        assert!(r.required(&Method::POST, "/chat").is_empty());
    }

    #[test]
    fn scope_coverage() {
        let granted = vec!["chat".to_string(), "read".to_string()];
        assert!(covers(&granted, &["chat".to_string()]));
        assert!(covers(&granted, &[]));
        assert!(!covers(&granted, &["admin".to_string()]));
    }
}
