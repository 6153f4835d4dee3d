//! Route classification: which webhooks concern carts and orders, and what they mean.
//! Routes are OrderCloud's templates (`v1/orders/{direction}/{orderID}/lineitems`), matched exactly.

use crate::domain::intent::{IntentKind, RouteFamily};

/// What a webhook's route and verb mean for the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    pub kind: IntentKind,
    pub family: RouteFamily,
    /// A bundle route: several lines in one call.
    pub bundle: bool,
}

/// Classifies a route template and verb (upper case); `None` for routes the forwarder ignores.
pub fn classify(verb: &str, route: &str) -> Option<RouteMatch> {
    use IntentKind::*;
    use RouteFamily::*;
    let m = |kind, family| {
        Some(RouteMatch {
            kind,
            family,
            bundle: false,
        })
    };
    let bundle = |kind, family| {
        Some(RouteMatch {
            kind,
            family,
            bundle: true,
        })
    };
    match (verb, route.trim_matches('/')) {
        ("POST", "v1/orders/{direction}/{orderID}/lineitems") => m(LinesUpserted, Orders),
        ("PUT" | "PATCH", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}") => m(LinesUpserted, Orders),
        ("DELETE", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}") => m(LineDeleted, Orders),
        ("POST", "v1/orders/{direction}/{orderID}/bundles/{bundleID}") => bundle(LinesUpserted, Orders),
        ("DELETE", "v1/orders/{direction}/{orderID}/bundles/{bundleID}/{bundleItemID}") => bundle(LineDeleted, Orders),
        ("DELETE", "v1/orders/{direction}/{orderID}") => m(CartDeleted, Orders),
        ("POST", "v1/orders/{direction}/{orderID}/submit") => m(OrderSubmitted, Orders),
        ("PATCH", "v1/orders/{direction}/{orderID}/fromuser") => m(GuestDetails, Orders),
        ("POST", "v1/cart/lineitems") => m(LinesUpserted, Cart),
        ("PUT" | "PATCH", "v1/cart/lineitems/{lineItemID}") => m(LinesUpserted, Cart),
        ("DELETE", "v1/cart/lineitems/{lineItemID}") => m(LineDeleted, Cart),
        ("POST", "v1/cart/bundles/{bundleID}") => bundle(LinesUpserted, Cart),
        ("DELETE", "v1/cart/bundles/{bundleID}/{bundleItemID}") => bundle(LineDeleted, Cart),
        ("DELETE", "v1/cart") => m(CartDeleted, Cart),
        ("POST", "v1/cart/submit") => m(OrderSubmitted, Cart),
        ("PATCH", "v1/cart/fromuser") => m(GuestDetails, Cart),
        ("PUT", "v1/me/register") => m(Registered, Me),
        ("PUT", "v1/me/orders") => m(AnonOrderTransferred, Me),
        _ => None,
    }
}

/// Every (verb, route) the forwarder handles, for the webhook registration document and tests.
pub const HANDLED_ROUTES: &[(&str, &str)] = &[
    ("POST", "v1/orders/{direction}/{orderID}/lineitems"),
    ("PUT", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}"),
    ("PATCH", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}"),
    ("DELETE", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}"),
    ("POST", "v1/orders/{direction}/{orderID}/bundles/{bundleID}"),
    (
        "DELETE",
        "v1/orders/{direction}/{orderID}/bundles/{bundleID}/{bundleItemID}",
    ),
    ("DELETE", "v1/orders/{direction}/{orderID}"),
    ("POST", "v1/orders/{direction}/{orderID}/submit"),
    ("PATCH", "v1/orders/{direction}/{orderID}/fromuser"),
    ("POST", "v1/cart/lineitems"),
    ("PUT", "v1/cart/lineitems/{lineItemID}"),
    ("PATCH", "v1/cart/lineitems/{lineItemID}"),
    ("DELETE", "v1/cart/lineitems/{lineItemID}"),
    ("POST", "v1/cart/bundles/{bundleID}"),
    ("DELETE", "v1/cart/bundles/{bundleID}/{bundleItemID}"),
    ("DELETE", "v1/cart"),
    ("POST", "v1/cart/submit"),
    ("PATCH", "v1/cart/fromuser"),
    ("PUT", "v1/me/register"),
    ("PUT", "v1/me/orders"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_handled_route_classifies() {
        for (verb, route) in HANDLED_ROUTES {
            assert!(classify(verb, route).is_some(), "{verb} {route}");
        }
    }

    #[test]
    fn families_and_kinds() {
        let line = classify("POST", "v1/cart/lineitems").unwrap();
        assert_eq!((line.kind, line.family), (IntentKind::LinesUpserted, RouteFamily::Cart));
        let del = classify("DELETE", "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}").unwrap();
        assert_eq!((del.kind, del.family), (IntentKind::LineDeleted, RouteFamily::Orders));
        assert_eq!(
            classify("POST", "v1/orders/{direction}/{orderID}/submit").unwrap().kind,
            IntentKind::OrderSubmitted
        );
        assert!(
            classify("POST", "v1/orders/{direction}/{orderID}/bundles/{bundleID}")
                .unwrap()
                .bundle
        );
    }

    #[test]
    fn unrelated_routes_and_verbs_are_ignored() {
        assert_eq!(classify("PUT", "v1/buyers/{buyerID}"), None);
        assert_eq!(classify("GET", "v1/cart/lineitems"), None);
        assert_eq!(classify("POST", "v1/cart"), None);
        assert_eq!(classify("PATCH", "v1/orders/{direction}/{orderID}"), None);
    }
}
