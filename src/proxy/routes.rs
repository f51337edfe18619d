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
        self.find(method, path, false)
    }

    /// As a case-insensitive router (IIS, ASP.NET, some Spring set-ups) would match
    /// `path`: for checking that `/ADMIN` needs what `/admin` needs.
    pub fn required_any_case(&self, method: &Method, path: &str) -> &[String] {
        self.find(method, path, true)
    }

    fn find(&self, method: &Method, path: &str, any_case: bool) -> &[String] {
        self.rules
            .iter()
            .find(|r| prefix_matches(&r.prefix, path, any_case) && method_matches(&r.methods, method))
            .map_or(&[], |r| r.scopes.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// A rule for GET also covers HEAD: most frameworks answer HEAD with the GET handler,
/// so leaving it out would let HEAD run that handler without the scope. Names match in
/// any case, since some upstreams (Werkzeug, so Flask) upper-case `get` into GET.
fn method_matches(methods: &[Method], method: &Method) -> bool {
    let is = |m: &Method, name: &str| m.as_str().eq_ignore_ascii_case(name);
    let head = is(method, "HEAD");
    methods.is_empty()
        || methods
            .iter()
            .any(|m| is(m, method.as_str()) || (head && *m == Method::GET))
}

/// Segment-aware: `/v1/chat` matches `/v1/chat` and `/v1/chat/completions`, not `/v1/chatty`.
fn prefix_matches(prefix: &str, path: &str, any_case: bool) -> bool {
    let rest = match path.get(..prefix.len()) {
        Some(head) if head == prefix || (any_case && head.eq_ignore_ascii_case(prefix)) => &path[prefix.len()..],
        _ => return false,
    };
    rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/')
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
    fn head_needs_what_get_needs() {
        let r = Routes::new(vec![rule("/v1/models", &[Method::GET], &["read"])]);
        assert_eq!(r.required(&Method::HEAD, "/v1/models"), ["read"]);
        assert!(r.required(&Method::POST, "/v1/models").is_empty());
        let head_only = Routes::new(vec![rule("/x", &[Method::HEAD], &["h"])]);
        assert!(head_only.required(&Method::GET, "/x").is_empty());
    }

    #[test]
    fn methods_match_in_any_case() {
        let r = Routes::new(vec![rule("/admin", &[Method::GET, Method::POST], &["admin"])]);
        for m in ["get", "Get", "post", "head", "HEAD"] {
            let method = Method::from_bytes(m.as_bytes()).expect("a token");
            assert_eq!(r.required(&method, "/admin"), ["admin"], "{m}");
        }
        let delete = Method::from_bytes(b"delete").expect("a token");
        assert!(r.required(&delete, "/admin").is_empty());
    }

    #[test]
    fn any_case_matching_is_only_asked_for_explicitly() {
        let r = Routes::new(vec![rule("/admin/", &[], &["admin"]), rule("/v1", &[], &["read"])]);
        assert!(r.required(&Method::GET, "/ADMIN/keys").is_empty());
        assert_eq!(r.required_any_case(&Method::GET, "/ADMIN/keys"), ["admin"]);
        assert_eq!(r.required_any_case(&Method::GET, "/Admin/"), ["admin"]);
        assert_eq!(r.required_any_case(&Method::GET, "/V1"), ["read"]);
        assert!(r.required_any_case(&Method::GET, "/V1x").is_empty());
        // A prefix boundary inside a multi-byte character is no match, not a panic.
        assert!(r.required_any_case(&Method::GET, "/éé").is_empty());
    }

    #[test]
    fn scope_coverage() {
        let granted = vec!["chat".to_string(), "read".to_string()];
        assert!(covers(&granted, &["chat".to_string()]));
        assert!(covers(&granted, &[]));
        assert!(!covers(&granted, &["admin".to_string()]));
    }
}
