//! Enrichment: the OrderCloud reads an intent needs (identity, order ID, the order's lines), run as
//! soon as the intent is stored, independently of CDP. Results are stored with the intent and the
//! tokens erased, so a CDP outage longer than a token's life still delivers, and the lines are a
//! snapshot of the moment the shopper acted.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Deps;
use crate::domain::intent::{Intent, IntentKind, RawIntent, RouteFamily, UnreadableIntent};
use crate::domain::now_ms;
use crate::ordercloud::client::OrderCloudError;
use crate::ordercloud::token;
use crate::planner::lines::Line;
use crate::planner::Profile;
use crate::store::EnrichmentJob;

/// What enrichment found, stored as JSON with the intent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Enrichment {
    /// `anon-<orderid>` or `<BuyerID>-<UserID>`.
    pub identity: String,
    #[serde(default)]
    pub profile: Profile,
    /// The user's locale currency (MeUser.Locale.Currency).
    #[serde(default)]
    pub locale_currency: Option<String>,
    /// The order's ID (Cart API routes carry none), currency and total.
    #[serde(default)]
    pub order_id: Option<String>,
    #[serde(default)]
    pub order_currency: Option<String>,
    #[serde(default)]
    pub order_total: Option<f64>,
    /// OrderCloud's lines of the order when the shopper acted (line delete, submit, transfer), each
    /// as [`Line::kept`] keeps it.
    #[serde(default)]
    pub lines: Option<Vec<Value>>,
    /// Why the lines could not be read; delivery then uses its own record of the cart.
    #[serde(default)]
    pub lines_error: Option<String>,
    #[serde(default)]
    pub link: Option<Link>,
}

/// An anonymous shopper becoming a registered one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Queue key of the anonymous shopper, when known.
    pub anon_shopper_key: Option<String>,
    pub anon_order_id: Option<String>,
    pub registered_shopper_key: String,
    pub registered_identity: String,
    #[serde(default)]
    pub registered_profile: Profile,
}

/// Why enrichment stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrichError {
    /// Try again later (OrderCloud unavailable).
    Retry(String),
    /// Never going to work: dead-letter the intent with this reason.
    Dead(String),
}

impl From<UnreadableIntent> for EnrichError {
    fn from(e: UnreadableIntent) -> Self {
        EnrichError::Dead(e.to_string())
    }
}

impl From<crate::store::StoreError> for EnrichError {
    fn from(e: crate::store::StoreError) -> Self {
        EnrichError::Retry(e.to_string())
    }
}

fn text(value: &Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Email, names and phone of a MeUser, an OrderUser or a User body.
pub fn profile_of(user: &Value) -> Profile {
    Profile {
        email: text(user, "/Email"),
        firstname: text(user, "/FirstName"),
        lastname: text(user, "/LastName"),
        phone: text(user, "/Phone"),
    }
}

/// `<BuyerID>-<UserID>` from an Order's FromCompanyID and FromUser.ID.
fn identity_from_order(order: &Value) -> Option<String> {
    let buyer = text(order, "/FromCompanyID")?;
    let user = text(order, "/FromUser/ID").or_else(|| text(order, "/FromUserID"))?;
    Some(format!("{buyer}-{user}"))
}

/// `<BuyerID>-<UserID>` from a MeUser.
fn identity_from_me(me: &Value) -> Option<String> {
    Some(format!("{}-{}", text(me, "/Buyer/ID")?, text(me, "/ID")?))
}

/// The response body when it is an Order (submit, fromuser), parsed.
fn order_in_response(intent: &RawIntent) -> Result<Option<Value>, UnreadableIntent> {
    if !matches!(intent.kind, IntentKind::OrderSubmitted | IntentKind::GuestDetails) {
        return Ok(None);
    }
    Ok(Some(intent.response()?).filter(|b| b.get("ID").is_some()))
}

fn transient_or_dead(e: OrderCloudError, what: &str) -> EnrichError {
    if e.is_transient() {
        EnrichError::Retry(format!("{what}: {e}"))
    } else {
        EnrichError::Dead(format!("{what}: {e}"))
    }
}

/// What an intent needs no network for: an anonymous shopper's line change, cart deletion or guest
/// details (the identity is the token's `orderid`). Intake stores it right away, sparing the
/// enrichment round; `None` when OrderCloud must be read.
pub fn without_network(intent: &RawIntent) -> Result<Option<Enrichment>, UnreadableIntent> {
    let Some(orderid) = intent.anon_order_id.as_deref().filter(|o| !o.is_empty()) else {
        return Ok(None);
    };
    if !answerable_without_network(intent) {
        return Ok(None);
    }
    Ok(Some(Enrichment {
        identity: format!("anon-{orderid}"),
        order_id: intent.order_id.clone().or_else(|| Some(orderid.to_string())),
        order_currency: order_in_response(intent)?.and_then(|o| text(&o, "/Currency")),
        ..Enrichment::default()
    }))
}

/// Whether [`without_network`] answers for this intent (read from its kind and token alone, so
/// intake can tell before parsing the bodies).
pub fn answerable_without_network<B>(intent: &Intent<B>) -> bool {
    let cheap = matches!(
        intent.kind,
        IntentKind::LinesUpserted | IntentKind::CartDeleted | IntentKind::GuestDetails
    );
    intent.anonymous && cheap && intent.anon_order_id.as_deref().is_some_and(|o| !o.is_empty())
}

/// Whether a registered shopper's intent needs from OrderCloud nothing but the shopper's identity
/// (read from its kind and route alone, so intake can tell before parsing the bodies): a line
/// change or a cart deletion on an order's route. With the identity stored already, enrichment
/// would read it from the store and find nothing else to read: [`with_known_identity`].
pub fn answerable_with_identity<B>(intent: &Intent<B>) -> bool {
    !intent.anonymous
        && matches!(intent.kind, IntentKind::LinesUpserted | IntentKind::CartDeleted)
        && intent.family == RouteFamily::Orders
        && intent.order_id.as_deref().is_some_and(|o| !o.is_empty())
}

/// What [`enrich`] finds for an intent [`answerable_with_identity`] whose shopper's identity is
/// stored: that identity and the route's order.
pub fn with_known_identity<B>(intent: &Intent<B>, identity: String) -> Enrichment {
    Enrichment {
        identity,
        order_id: intent.order_id.clone(),
        ..Enrichment::default()
    }
}

/// Runs the reads one intent needs.
pub async fn enrich(deps: &Deps, job: &EnrichmentJob) -> Result<Enrichment, EnrichError> {
    let intent = &job.intent;
    let now_secs = now_ms() / 1000;
    let token = job.secrets.user_token.as_deref();
    let token_live = token.is_some() && intent.token_expires_at.is_none_or(|exp| exp > now_secs);
    let base = deps.ordercloud.base_for(intent.api_url.as_deref());
    let mut out = Enrichment::default();

    // Identity.
    let order = order_in_response(intent)?;
    let order = order.as_ref();
    if let Some(order) = order {
        out.order_id = text(order, "/ID");
        out.order_currency = text(order, "/Currency");
        out.order_total = order.get("Total").and_then(Value::as_f64);
        out.profile = profile_of(order.get("FromUser").unwrap_or(&Value::Null));
    }
    if intent.anonymous {
        metrics::counter!("forwarder_identity_lookups_total", "source" => "token").increment(1);
        out.identity = format!("anon-{}", intent.anon_order_id.as_deref().unwrap_or_default());
    } else if let Some(identity) = order.and_then(identity_from_order) {
        metrics::counter!("forwarder_identity_lookups_total", "source" => "order").increment(1);
        out.identity = identity;
    } else if let Some(identity) = deps.store.shopper(&job.shopper_key).await?.and_then(|s| s.identity) {
        metrics::counter!("forwarder_identity_lookups_total", "source" => "cache").increment(1);
        out.identity = identity;
    } else {
        if !token_live {
            return Err(EnrichError::Dead(
                "UserToken expired before the shopper's identity could be resolved, and none is cached".into(),
            ));
        }
        let base = base.clone().map_err(|e| EnrichError::Dead(e.to_string()))?;
        metrics::counter!("forwarder_identity_lookups_total", "source" => "ordercloud").increment(1);
        let me = match deps.ordercloud.me(&base, token.unwrap_or_default()).await {
            Ok(me) => me,
            Err(e) => return Err(transient_or_dead(e, "GET v1/me")),
        };
        out.identity = identity_from_me(&me)
            .ok_or_else(|| EnrichError::Dead("GET v1/me answered without Buyer.ID and ID".into()))?;
        out.profile = profile_of(&me).merged_with(&out.profile);
        out.locale_currency = text(&me, "/Locale/Currency");
    }

    // The order: routes of the Orders family name it; Cart API routes do not.
    if out.order_id.is_none() {
        out.order_id = intent.order_id.clone();
    }
    if out.order_id.is_none() && intent.family == RouteFamily::Cart {
        if intent.anonymous {
            out.order_id = intent.anon_order_id.clone();
        } else if let (true, Ok(base)) = (token_live, &base) {
            match deps.ordercloud.cart(base, token.unwrap_or_default()).await {
                Ok(cart) => {
                    out.order_id = text(&cart, "/ID");
                    out.order_currency = out.order_currency.or_else(|| text(&cart, "/Currency"));
                }
                Err(e) if e.is_transient() => return Err(EnrichError::Retry(format!("GET v1/cart: {e}"))),
                Err(_) => {}
            }
        }
    }

    // Links between an anonymous and a registered shopper.
    match intent.kind {
        IntentKind::Registered => out.link = Some(link_registration(deps, job, &out).await?),
        IntentKind::AnonOrderTransferred => {
            let link = link_transfer(deps, job, &out).await?;
            if out.order_id.is_none() {
                out.order_id = link.anon_order_id.clone();
            }
            out.link = Some(link);
        }
        _ => {}
    }

    // The order's lines as they are now.
    let needs_lines = matches!(
        intent.kind,
        IntentKind::LineDeleted | IntentKind::OrderSubmitted | IntentKind::AnonOrderTransferred
    );
    if needs_lines {
        let read = match (&base, token_live) {
            (Err(e), _) => Err(e.to_string()),
            (Ok(_), false) => Err("UserToken missing or expired".to_string()),
            (Ok(base), true) => {
                let direction = intent.direction.as_deref().unwrap_or("Outgoing");
                let order = out.order_id.as_deref().map(|id| (direction, id));
                match deps.ordercloud.lines(base, token.unwrap_or_default(), order).await {
                    Ok(lines) => Ok(lines),
                    Err(e) if e.is_transient() => return Err(EnrichError::Retry(format!("line items: {e}"))),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        match read {
            // Kept as the record of a cart keeps a line: what planning reads of it, not the ~2 KB of
            // each LineItem that would be stored, read back and decoded at every claim.
            Ok(lines) => out.lines = Some(lines.iter().map(Line::kept).collect()),
            Err(reason) => out.lines_error = Some(reason),
        }
    }
    Ok(out)
}

/// Registration: the webhook's token is the anonymous one; the response's access_token is the new user's.
async fn link_registration(deps: &Deps, job: &EnrichmentJob, out: &Enrichment) -> Result<Link, EnrichError> {
    let intent = &job.intent;
    let new_token =
        job.secrets.registered_token.as_deref().ok_or_else(|| {
            EnrichError::Dead("register answer carries no access_token: cannot link the new user".into())
        })?;
    let claims =
        token::decode_claims(new_token).map_err(|e| EnrichError::Dead(format!("register access_token: {e}")))?;
    let registered_shopper_key =
        token::shopper_key(&claims).map_err(|e| EnrichError::Dead(format!("register access_token: {e}")))?;
    let base = deps
        .ordercloud
        .base_for(claims.aud.as_deref())
        .map_err(|e| EnrichError::Dead(e.to_string()))?;
    // Read before the call: an unreadable body makes no request.
    let given = profile_of(&intent.request()?);
    metrics::counter!("forwarder_identity_lookups_total", "source" => "ordercloud").increment(1);
    let me = deps
        .ordercloud
        .me(&base, new_token)
        .await
        .map_err(|e| transient_or_dead(e, "GET v1/me with the new user's token"))?;
    let registered_identity =
        identity_from_me(&me).ok_or_else(|| EnrichError::Dead("GET v1/me answered without Buyer.ID and ID".into()))?;
    Ok(Link {
        anon_shopper_key: intent.anonymous.then(|| job.shopper_key.clone()),
        anon_order_id: intent.anon_order_id.clone(),
        registered_shopper_key,
        registered_identity,
        registered_profile: given.merged_with(&profile_of(&me)).merged_with(&out.profile),
    })
}

/// Anonymous order transfer: the webhook's token is the logged-in user's; the anonymous token may be
/// in `QueryParams.anonUserToken` (unconfirmed). Without it, the forwarder's own record of which
/// shopper's lines the current cart holds names the anonymous shopper.
async fn link_transfer(deps: &Deps, job: &EnrichmentJob, out: &Enrichment) -> Result<Link, EnrichError> {
    let mut link = Link {
        registered_shopper_key: job.shopper_key.clone(),
        registered_identity: out.identity.clone(),
        registered_profile: out.profile.clone(),
        ..Link::default()
    };
    let anon_claims = job
        .secrets
        .anon_user_token
        .as_deref()
        .and_then(|t| token::decode_claims(t).ok())
        .filter(|c| c.is_anonymous());
    if let Some(claims) = anon_claims {
        link.anon_order_id = claims.orderid.clone();
        link.anon_shopper_key = token::shopper_key(&claims).ok();
    } else if let Some(order_id) = &out.order_id {
        let recorded = deps.store.cart_lines(order_id).await?;
        if let Some(line) = recorded.iter().find(|l| l.shopper_key.starts_with("anon-")) {
            link.anon_shopper_key = Some(line.shopper_key.clone());
            link.anon_order_id = Some(order_id.clone());
        }
    } else if let (Some(token), Ok(base)) = (
        job.secrets.user_token.as_deref(),
        deps.ordercloud.base_for(job.intent.api_url.as_deref()),
    ) {
        // The transferred order is now the user's cart (when they had none).
        if let Ok(cart) = deps.ordercloud.cart(&base, token).await {
            if let Some(order_id) = text(&cart, "/ID") {
                let recorded = deps.store.cart_lines(&order_id).await?;
                if let Some(line) = recorded.iter().find(|l| l.shopper_key.starts_with("anon-")) {
                    link.anon_shopper_key = Some(line.shopper_key.clone());
                    link.anon_order_id = Some(order_id);
                }
            }
        }
    }
    Ok(link)
}
