//! The admin API's route table, as data, and the matcher that resolves a request to one
//! of its operations.
//!
//! Owns which (method, path template) pairs exist. It does not own what an operation
//! does (`handlers`) or who may call it (`super`). The table is public so a test can
//! hold it against `docs/admin-openapi.json`: every route documented, nothing extra.

use http::Method;

/// What a matched route does; `handlers::dispatch` has one arm per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    CreateOrg,
    ListOrgs,
    GetOrg,
    UpdateOrg,
    DisableOrg,
    CreateKey,
    ListKeys,
    RevokeKey,
    RotateKey,
    UsageReport,
    OpenApi,
}

/// One route: an HTTP method and a path template in OpenAPI's form, `{name}` standing
/// for one non-empty path segment.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub op: Op,
}

const fn route(method: Method, path: &'static str, op: Op) -> Route {
    Route { method, path, op }
}

/// Every path starts with this; anything else on the admin listener is not the API's.
pub const PREFIX: &str = "/admin/v1/";

/// Every route the admin API serves.
pub static ROUTES: &[Route] = &[
    route(Method::POST, "/admin/v1/orgs", Op::CreateOrg),
    route(Method::GET, "/admin/v1/orgs", Op::ListOrgs),
    route(Method::GET, "/admin/v1/orgs/{slug}", Op::GetOrg),
    route(Method::PATCH, "/admin/v1/orgs/{slug}", Op::UpdateOrg),
    route(Method::POST, "/admin/v1/orgs/{slug}/disable", Op::DisableOrg),
    route(Method::POST, "/admin/v1/orgs/{slug}/keys", Op::CreateKey),
    route(Method::GET, "/admin/v1/orgs/{slug}/keys", Op::ListKeys),
    route(Method::POST, "/admin/v1/keys/{id}/revoke", Op::RevokeKey),
    route(Method::POST, "/admin/v1/keys/{id}/rotate", Op::RotateKey),
    route(Method::GET, "/admin/v1/orgs/{slug}/usage", Op::UsageReport),
    route(Method::GET, "/admin/v1/openapi.json", Op::OpenApi),
];

/// The path parameter of a matched route (each route has at most one), borrowed from
/// the request path.
#[derive(Debug, Clone, Copy, Default)]
pub struct Param<'a>(Option<&'a str>);

impl<'a> Param<'a> {
    /// The captured segment; empty when the route has none (never the case for the
    /// routes that read it, since a template's `{…}` only matches a non-empty segment).
    pub fn value(self) -> &'a str {
        self.0.unwrap_or_default()
    }
}

#[derive(Debug)]
pub enum Resolution<'a> {
    Found(Op, Param<'a>),
    /// The path exists, under other methods (for the `Allow` header).
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// Resolves `method` and `path` against [`ROUTES`].
pub fn resolve<'a>(method: &Method, path: &'a str) -> Resolution<'a> {
    let mut allowed = Vec::new();
    for r in ROUTES {
        if let Some(param) = matches(r.path, path) {
            if r.method == *method {
                return Resolution::Found(r.op, param);
            }
            allowed.push(r.method.clone());
        }
    }
    if allowed.is_empty() {
        Resolution::NotFound
    } else {
        Resolution::MethodNotAllowed(allowed)
    }
}

/// Segment-by-segment match; `{…}` captures one non-empty segment. No trailing-slash
/// or case folding: a path is either exactly a route or not one.
fn matches<'a>(template: &str, path: &'a str) -> Option<Param<'a>> {
    let mut param = None;
    let mut want = template.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(Param(param)),
            (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') => {
                if g.is_empty() {
                    return None;
                }
                param = Some(g);
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_literals_params_and_methods() {
        assert!(matches!(
            resolve(&Method::GET, "/admin/v1/orgs"),
            Resolution::Found(Op::ListOrgs, _)
        ));
        match resolve(&Method::PATCH, "/admin/v1/orgs/acme") {
            Resolution::Found(Op::UpdateOrg, p) => assert_eq!(p.value(), "acme"),
            other => panic!("{other:?}"),
        }
        match resolve(&Method::POST, "/admin/v1/keys/0190-abc/rotate") {
            Resolution::Found(Op::RotateKey, p) => assert_eq!(p.value(), "0190-abc"),
            other => panic!("{other:?}"),
        }
        match resolve(&Method::DELETE, "/admin/v1/orgs/acme") {
            Resolution::MethodNotAllowed(m) => assert_eq!(m, vec![Method::GET, Method::PATCH]),
            other => panic!("{other:?}"),
        }
        for path in [
            "/admin/v1/orgs/",
            "/admin/v1/orgs//keys",
            "/admin/v1/orgs/a/b/keys",
            "/admin/v1",
            "/admin/v2/orgs",
        ] {
            assert!(matches!(resolve(&Method::GET, path), Resolution::NotFound), "{path}");
        }
    }

    #[test]
    fn every_route_is_under_the_prefix_and_unique() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert!(r.path.starts_with(PREFIX), "{}", r.path);
            assert!(
                !ROUTES[..i].iter().any(|o| o.path == r.path && o.method == r.method),
                "{} {} twice",
                r.method,
                r.path
            );
        }
    }
}
