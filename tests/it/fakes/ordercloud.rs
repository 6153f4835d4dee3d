//! A fake of the OrderCloud read API the forwarder calls with a shopper's `UserToken`
//! (`ordercloud.md` §5, §7, §8):
//! - `GET /v1/me` → MeUser: how `<BuyerID>-<UserID>` is resolved, since the JWT carries neither (§7.2);
//! - `GET /v1/cart`, `GET /v1/cart/lineitems`: the Cart API carries no order ID in webhooks (§5);
//! - `GET /v1/orders/{direction}/{orderID}/lineitems`: submit returns only the Order (§5);
//! - for the forwarder's own API client (§15 of the reference, reconciliation): `POST /oauth/token`
//!   (client credentials; a wrong id or secret is 400 `invalid_client`), `GET /v1/orders/Incoming`
//!   (submitted orders, `DateSubmitted=>…` filter, `sortBy=DateSubmitted,ID`, list pages, served from a
//!   search cache that lags behind submits: [`OrderCloudFake::set_search_lag`]), the lines of any
//!   incoming order, and `GET /v1/apiclients` (each client's `DefaultContextUserName`).
//!
//! Tokens are opaque strings here: the test registers the JWT it puts in a webhook and the fake
//! maps it to a user or an anonymous shopper. Calls with an unknown or expired token get 401, as
//! calls with `UserToken` after `exp` do (§7.2).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// Buyer of anonymous shoppers in `GET /v1/me`.
pub const ANON_BUYER_ID: &str = "anon-buyer";

pub struct OrderCloudFake {
    addr: SocketAddr,
    state: Arc<Mutex<OcState>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OrderCloudFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone, Debug)]
struct User {
    buyer_id: String,
    user_id: String,
    username: String,
    email: String,
    first: String,
    last: String,
}

/// Who a token belongs to. Anonymous shoppers are told apart by their `orderid` claim, "the only
/// property that is unique in that scenario" (§9): two tokens with one `orderid` are one shopper.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    User(String),
    Anon(String),
    /// The marketplace's API client (client credentials): reads every incoming order.
    ApiClient(String),
}

struct OrderRecord {
    order: Value,
    lines: Vec<Value>,
    owner: Owner,
    submitted: bool,
    /// Bumped by `set_cart`/`transfer_order`: the owner's cart is their newest unsubmitted order.
    seq: u64,
}

#[derive(Default)]
struct OcState {
    users: HashMap<String, User>,
    tokens: HashMap<String, Owner>,
    expired: HashSet<String>,
    orders: HashMap<String, OrderRecord>,
    seq: u64,
    script: VecDeque<u16>,
    delay: Duration,
    calls: Vec<String>,
    /// API clients: id → (secret, DefaultContextUserName).
    api_clients: Vec<(String, String, String)>,
    /// Orders submitted less than this long ago are not listed yet (the search cache's lag).
    search_lag: Duration,
    /// Orders whose lines answer 404 (deleted since they were listed).
    lines_gone: HashSet<String>,
    /// Requests bearing these tokens wait this long more (one slow shopper).
    token_delays: HashMap<String, Duration>,
    /// Orders whose lines answer 503 (OrderCloud failing on one order, for now).
    lines_failing: HashSet<String>,
    /// Order lists hold at most this many orders a page, whatever `pageSize` asks.
    orders_page_cap: Option<usize>,
    /// Order lists answered so far: orders tied on every sort field come back in an order that
    /// changes from one list to the next (a search index has no tie-break of its own).
    order_lists: u64,
}

impl OcState {
    fn owner_of(&self, token: &str) -> Owner {
        self.tokens
            .get(token)
            .cloned()
            .unwrap_or_else(|| panic!("OrderCloudFake: token {token:?} is not registered"))
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// "the user's current cart": newest unsubmitted order of `owner`.
    fn cart_of(&self, owner: &Owner) -> Option<&OrderRecord> {
        self.orders
            .values()
            .filter(|o| &o.owner == owner && !o.submitted)
            .max_by_key(|o| o.seq)
    }
}

impl OrderCloudFake {
    pub async fn start() -> OrderCloudFake {
        let state = Arc::new(Mutex::new(OcState::default()));
        let app = Router::new()
            .route("/v1/me", get(me))
            .route("/v1/cart", get(cart))
            .route("/v1/cart/lineitems", get(cart_lines))
            .route("/v1/orders/{direction}/{order_id}/lineitems", get(order_lines))
            .route("/v1/orders/{direction}", get(orders_list))
            .route("/v1/apiclients", get(api_clients))
            .route("/oauth/token", axum::routing::post(oauth_token))
            .fallback(unknown_route)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OrderCloud fake");
        let addr = listener.local_addr().expect("OrderCloud fake address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OrderCloudFake { addr, state, server }
    }

    /// `http://127.0.0.1:PORT`: tests put it in the token's `aud` (§7.1: `aud` is the API base URL).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, OcState> {
        lock(&self.state)
    }

    /// A registered buyer user; `GET /v1/me` gives `Buyer.ID = buyer_id`, `ID = user_id`.
    pub fn add_user(&self, buyer_id: &str, user_id: &str, username: &str, email: &str, first: &str, last: &str) {
        let user = User {
            buyer_id: buyer_id.into(),
            user_id: user_id.into(),
            username: username.into(),
            email: email.into(),
            first: first.into(),
            last: last.into(),
        };
        self.lock().users.insert(username.to_string(), user);
    }

    /// Maps `token` to the registered user `username` (panics if `add_user` was not called first).
    pub fn register_token(&self, token: &str, username: &str) {
        let mut st = self.lock();
        assert!(
            st.users.contains_key(username),
            "OrderCloudFake: add_user({username:?}) before register_token"
        );
        st.tokens.insert(token.to_string(), Owner::User(username.to_string()));
    }

    /// Maps `token` to the anonymous shopper whose token claim `orderid` is `order_id` (§7.1).
    pub fn register_anon_token(&self, token: &str, order_id: &str) {
        self.lock()
            .tokens
            .insert(token.to_string(), Owner::Anon(order_id.to_string()));
    }

    /// Later calls with `token` get 401 InvalidToken (§7.2: calls fail after `exp`).
    pub fn expire_token(&self, token: &str) {
        self.lock().expired.insert(token.to_string());
    }

    /// Creates or replaces order `order["ID"]`, unsubmitted and owned by the token's shopper; it
    /// becomes their current cart (the newest unsubmitted order they own).
    pub fn set_cart(&self, owner_token: &str, order: Value, lines: Vec<Value>) {
        let id = order["ID"]
            .as_str()
            .expect("OrderCloudFake::set_cart: order needs a string \"ID\"")
            .to_string();
        let mut st = self.lock();
        let owner = st.owner_of(owner_token);
        let seq = st.next_seq();
        st.orders.insert(
            id,
            OrderRecord {
                order,
                lines,
                owner,
                submitted: false,
                seq,
            },
        );
    }

    /// Replaces the line items of an existing order (panics if unknown).
    pub fn set_lines(&self, order_id: &str, lines: Vec<Value>) {
        let mut st = self.lock();
        let record = st
            .orders
            .get_mut(order_id)
            .unwrap_or_else(|| panic!("OrderCloudFake: no order {order_id:?}"));
        record.lines = lines;
    }

    /// The current line items of an order (empty if unknown).
    pub fn lines(&self, order_id: &str) -> Vec<Value> {
        self.lock()
            .orders
            .get(order_id)
            .map(|o| o.lines.clone())
            .unwrap_or_default()
    }

    /// `PUT v1/me/orders` (TransferAnonUserOrder, §6): the order is reassigned to the token's
    /// shopper and, if unsubmitted, becomes their cart (merging is unconfirmed, §12.8: not modelled).
    pub fn transfer_order(&self, order_id: &str, to_token: &str) {
        let mut st = self.lock();
        let owner = st.owner_of(to_token);
        let seq = st.next_seq();
        let record = st
            .orders
            .get_mut(order_id)
            .unwrap_or_else(|| panic!("OrderCloudFake: no order {order_id:?}"));
        record.owner = owner;
        record.seq = seq;
    }

    /// Submits an order: it stays readable through `/v1/orders/...` but is no longer the cart.
    pub fn submit(&self, order_id: &str) {
        let mut st = self.lock();
        let record = st
            .orders
            .get_mut(order_id)
            .unwrap_or_else(|| panic!("OrderCloudFake: no order {order_id:?}"));
        record.submitted = true;
        if let Some(order) = record.order.as_object_mut() {
            // §8 Order: IsSubmitted, Status leaves Unsubmitted, DateSubmitted set.
            order.insert("IsSubmitted".into(), json!(true));
            order.insert("Status".into(), json!("Open"));
            order.insert("DateSubmitted".into(), json!(chrono::Utc::now().to_rfc3339()));
        }
    }

    /// An API client of the marketplace whose anonymous shoppers act as `default_context_username`.
    pub fn add_api_client(&self, client_id: &str, secret: &str, default_context_username: &str) {
        self.lock()
            .api_clients
            .push((client_id.into(), secret.into(), default_context_username.into()));
    }

    /// The order's lines answer 503 from now on, or again normally (`failing` false).
    pub fn fail_lines(&self, order_id: &str, failing: bool) {
        let mut st = self.lock();
        if failing {
            st.lines_failing.insert(order_id.to_string());
        } else {
            st.lines_failing.remove(order_id);
        }
    }

    /// The order's lines answer 404 from now on (it was deleted after being listed).
    pub fn lose_lines(&self, order_id: &str) {
        self.lock().lines_gone.insert(order_id.to_string());
    }

    /// Pages of `GET /v1/orders/Incoming` hold at most `cap` orders (`Meta.PageSize` says so):
    /// lets a test reach more pages than a pass reads with one query without ten thousand orders.
    pub fn cap_order_pages(&self, cap: usize) {
        self.lock().orders_page_cap = Some(cap);
    }

    /// Orders submitted less than `lag` ago are left out of `GET /v1/orders/Incoming`.
    pub fn set_search_lag(&self, lag: Duration) {
        self.lock().search_lag = lag;
    }

    /// A submitted order as an API client reads it (as `submit` leaves it), with its lines: for
    /// orders placed without a shopper of the test (the portal, another storefront).
    pub fn put_submitted(&self, order: Value, lines: Vec<Value>, date_submitted: chrono::DateTime<chrono::Utc>) {
        let id = order["ID"].as_str().expect("order needs a string \"ID\"").to_string();
        let mut order = order;
        order["IsSubmitted"] = json!(true);
        order["Status"] = json!("Open");
        order["DateSubmitted"] = json!(date_submitted.to_rfc3339());
        let mut st = self.lock();
        let seq = st.next_seq();
        st.orders.insert(
            id.clone(),
            OrderRecord {
                order,
                lines,
                owner: Owner::Anon(id),
                submitted: true,
                seq,
            },
        );
    }

    /// The next requests (any route) are answered with these statuses, one each, before any
    /// other processing; the body is OrderCloud's error shape.
    pub fn script(&self, statuses: Vec<u16>) {
        self.lock().script.extend(statuses);
    }

    /// Requests bearing `token` wait `delay` before being answered (a shopper whose reads are slow).
    pub fn set_token_delay(&self, token: &str, delay: Duration) {
        self.lock().token_delays.insert(token.to_string(), delay);
    }

    /// Every later request waits `delay` before being answered (to exercise client timeouts).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Requests received, e.g. `"GET /v1/orders/Outgoing/O1/lineitems?page=2&pageSize=100"`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }
}

fn lock(state: &Mutex<OcState>) -> MutexGuard<'_, OcState> {
    // A panicking test must not hide its own failure behind a poisoned-mutex panic.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

type Shared = Arc<Mutex<OcState>>;

/// OrderCloud's error body: `{"Errors":[{"ErrorCode","Message"}]}`.
fn oc_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "Errors": [{ "ErrorCode": code, "Message": message }] })),
    )
        .into_response()
}

fn invalid_token() -> Response {
    oc_error(
        StatusCode::UNAUTHORIZED,
        "InvalidToken",
        "Access token is invalid or expired.",
    )
}

fn not_found(what: &str) -> Response {
    oc_error(StatusCode::NOT_FOUND, "NotFound", &format!("{what} not found."))
}

/// Common to every route: record the call, wait the delay, answer a scripted status, then
/// authenticate the bearer token. Returns the token's owner or the response to send.
async fn begin(state: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Owner, Response> {
    let delay = {
        let mut st = lock(state);
        let target = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
        st.calls.push(format!("{method} {target}"));
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .map(|(_, token)| token.trim());
        st.delay + bearer.and_then(|t| st.token_delays.get(t)).copied().unwrap_or_default()
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await; // never holding the lock across the await
    }
    let mut st = lock(state);
    if let Some(status) = st.script.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(oc_error(status, "Scripted", &format!("scripted {}", status.as_u16())));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string())
        .ok_or_else(invalid_token)?;
    if st.expired.contains(&token) {
        return Err(invalid_token());
    }
    st.tokens.get(&token).cloned().ok_or_else(invalid_token)
}

/// `GET /v1/me` → MeUser (§8).
async fn me(State(state): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let owner = match begin(&state, &method, &uri, &headers).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    let st = lock(&state);
    let body = match owner {
        Owner::User(username) => {
            let Some(u) = st.users.get(&username) else {
                return invalid_token();
            };
            json!({
                "ID": u.user_id, "Username": u.username, "FirstName": u.first, "LastName": u.last,
                "Email": u.email, "Phone": null, "Active": true,
                "Buyer": { "ID": u.buyer_id, "DefaultCatalogID": null },
                "Locale": null, "xp": {}
            })
        }
        // §7.1: anonymous tokens act as the shared template user (`usr` = anon-template).
        Owner::ApiClient(_) => {
            return oc_error(
                StatusCode::FORBIDDEN,
                "InsufficientRoles",
                "A shopper's token is required.",
            )
        }
        Owner::Anon(_) => json!({
            "ID": "anon-template-user", "Username": "anon-template", "FirstName": null, "LastName": null,
            "Email": null, "Phone": null, "Active": true,
            "Buyer": { "ID": ANON_BUYER_ID, "DefaultCatalogID": null },
            "Locale": null, "xp": {}
        }),
    };
    Json(body).into_response()
}

/// `GET /v1/cart` → the owner's current cart Order.
async fn cart(State(state): State<Shared>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let owner = match begin(&state, &method, &uri, &headers).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    let st = lock(&state);
    match st.cart_of(&owner) {
        Some(record) => Json(record.order.clone()).into_response(),
        None => not_found("Cart"),
    }
}

/// `GET /v1/cart/lineitems` → list page of the cart's lines.
async fn cart_lines(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let owner = match begin(&state, &method, &uri, &headers).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    let st = lock(&state);
    match st.cart_of(&owner) {
        Some(record) => list_page(&record.lines, raw),
        None => not_found("Cart"),
    }
}

/// `GET /v1/orders/{direction}/{orderID}/lineitems` → list page of an order the token owns.
async fn order_lines(
    State(state): State<Shared>,
    Path((direction, order_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let owner = match begin(&state, &method, &uri, &headers).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    // §5: Incoming/Outgoing/All, "lower-case in the API reference: compare case-insensitively".
    // A shopper's own order is Outgoing (or All) from their side; Incoming finds nothing.
    let direction = direction.to_ascii_lowercase();
    if !["incoming", "outgoing", "all"].contains(&direction.as_str()) {
        return oc_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "direction must be Incoming, Outgoing or All.",
        );
    }
    let st = lock(&state);
    if st.lines_gone.contains(&order_id) {
        return not_found("Order");
    }
    if st.lines_failing.contains(&order_id) {
        return oc_error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "try again later");
    }
    match st.orders.get(&order_id) {
        Some(record) if record.owner == owner && direction != "incoming" => list_page(&record.lines, raw),
        // The marketplace owner's client sees every submitted order as incoming.
        Some(record) if matches!(owner, Owner::ApiClient(_)) && direction == "incoming" && record.submitted => {
            list_page(&record.lines, raw)
        }
        _ => not_found("Order"),
    }
}

/// `POST /oauth/token`, form-encoded client credentials → `{access_token, token_type, expires_in}`;
/// a wrong id or secret is 400 `{"error":"invalid_client"}`.
async fn oauth_token(State(state): State<Shared>, uri: Uri, body: String) -> Response {
    let mut st = lock(&state);
    st.calls.push(format!("POST {}", uri.path()));
    if let Some(status) = st.script.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return oc_error(status, "Scripted", &format!("scripted {}", status.as_u16()));
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let (Some(id), Some(secret)) = (form.get("client_id"), form.get("client_secret")) else {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_client"}))).into_response();
    };
    if !st.api_clients.iter().any(|(i, s, _)| i == id && s == secret) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_client"}))).into_response();
    }
    let seq = st.next_seq();
    let token = format!("client-token-{seq}");
    st.tokens.insert(token.clone(), Owner::ApiClient(id.clone()));
    Json(json!({"access_token": token, "token_type": "bearer", "expires_in": 600, "refresh_token": null}))
        .into_response()
}

/// `GET /v1/orders/Incoming` (API clients only): submitted orders, filtered by `DateSubmitted`
/// (`>x`, `>=x`, `<x`, `<=x`), sorted by `sortBy` (`DateSubmitted`, `ID`, a comma-delimited list
/// of them; ties in no fixed order), in list pages; orders submitted within the search lag are not
/// there yet.
async fn orders_list(
    State(state): State<Shared>,
    Path(direction): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let owner = match begin(&state, &method, &uri, &headers).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    if !matches!(owner, Owner::ApiClient(_)) || !direction.eq_ignore_ascii_case("incoming") {
        return oc_error(StatusCode::FORBIDDEN, "InsufficientRoles", "OrderReader is required.");
    }
    let query: Vec<(String, String)> = url::form_urlencoded::parse(raw.clone().unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let mut st = lock(&state);
    let visible_until = chrono::Utc::now() - chrono::Duration::from_std(st.search_lag).unwrap();
    let submitted_at = |o: &Value| {
        o["DateSubmitted"]
            .as_str()
            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
            .map(|d| d.with_timezone(&chrono::Utc))
    };
    let mut orders: Vec<Value> = st
        .orders
        .values()
        .filter(|r| r.submitted)
        .map(|r| r.order.clone())
        .filter(|o| submitted_at(o).is_some_and(|d| d <= visible_until))
        .collect();
    for (key, value) in &query {
        if !key.eq_ignore_ascii_case("DateSubmitted") {
            continue;
        }
        let (op, at) = ["<=", ">=", "<", ">"]
            .iter()
            .find_map(|op| value.strip_prefix(op).map(|rest| (*op, rest)))
            .unwrap_or(("=", value.as_str()));
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(at) else {
            let message = format!("DateSubmitted: {value:?} is not a date");
            return oc_error(StatusCode::BAD_REQUEST, "InvalidRequest", &message);
        };
        orders.retain(|o| {
            let d = submitted_at(o).unwrap();
            match op {
                ">" => d > at,
                ">=" => d >= at,
                "<" => d < at,
                "<=" => d <= at,
                _ => d == at,
            }
        });
    }
    // `sortBy` is a comma-delimited list of fields, each `!` for descending (js-sdk
    // `Sortable<'Orders.List'>`); orders tied on every field listed come back in no fixed order:
    // here ascending by ID on one list and descending on the next.
    let sort = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("sortBy"))
        .map_or("ID", |(_, v)| v.as_str());
    let mut fields = Vec::new();
    for field in sort.split(',') {
        let (descending, name) = field.strip_prefix('!').map_or((false, field), |f| (true, f));
        if !["DateSubmitted", "ID"].contains(&name) {
            let message = format!("sortBy: {name:?} is not a field this fake sorts by");
            return oc_error(StatusCode::BAD_REQUEST, "InvalidRequest", &message);
        }
        fields.push((name, descending));
    }
    st.order_lists += 1;
    let ties_descending = st.order_lists.is_multiple_of(2);
    orders.sort_by(|a, b| {
        let by_field = fields
            .iter()
            .fold(std::cmp::Ordering::Equal, |so_far, (name, descending)| {
                let this = if *name == "ID" {
                    a["ID"].as_str().cmp(&b["ID"].as_str())
                } else {
                    submitted_at(a).cmp(&submitted_at(b))
                };
                so_far.then(if *descending { this.reverse() } else { this })
            });
        let tie = a["ID"].as_str().cmp(&b["ID"].as_str());
        by_field.then(if ties_descending { tie.reverse() } else { tie })
    });
    let cap = st.orders_page_cap;
    drop(st);
    list_page_of_at_most(&orders, raw, cap)
}

/// `GET /v1/apiclients` (API clients only) → list page of `{ID, DefaultContextUserName}`.
async fn api_clients(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let owner = match begin(&state, &method, &uri, &headers).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    if !matches!(owner, Owner::ApiClient(_)) {
        return oc_error(
            StatusCode::FORBIDDEN,
            "InsufficientRoles",
            "ApiClientReader is required.",
        );
    }
    let clients: Vec<Value> = lock(&state)
        .api_clients
        .iter()
        .map(|(id, _, user)| json!({"ID": id, "DefaultContextUserName": user, "Active": true}))
        .collect();
    list_page(&clients, raw)
}

async fn unknown_route(State(state): State<Shared>, method: Method, uri: Uri) -> Response {
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
    lock(&state).calls.push(format!("{method} {target}"));
    not_found("Route")
}

/// §8 list page: `page` 1-based, `pageSize` default 20, max 100; query keys matched
/// case-insensitively (ASP.NET binding).
fn list_page(items: &[Value], raw_query: Option<String>) -> Response {
    list_page_of_at_most(items, raw_query, None)
}

/// [`list_page`] whose pages hold at most `cap` items whatever `pageSize` asks (`Meta.PageSize`
/// says so).
fn list_page_of_at_most(items: &[Value], raw_query: Option<String>, cap: Option<usize>) -> Response {
    let mut page: u64 = 1;
    let mut page_size: u64 = 20;
    for (key, value) in url::form_urlencoded::parse(raw_query.unwrap_or_default().as_bytes()) {
        let target = match key.to_ascii_lowercase().as_str() {
            "page" => &mut page,
            "pagesize" => &mut page_size,
            _ => continue,
        };
        match value.parse::<u64>() {
            Ok(n) if n >= 1 => *target = n,
            _ => {
                let msg = format!("{key} must be a positive integer.");
                return oc_error(StatusCode::BAD_REQUEST, "InvalidRequest", &msg);
            }
        }
    }
    if page_size > 100 {
        return oc_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "pageSize must be between 1 and 100.",
        );
    }
    if let Some(cap) = cap {
        page_size = page_size.min(cap as u64);
    }
    let total = items.len() as u64;
    let total_pages = total.div_ceil(page_size);
    let first = (page - 1) * page_size; // 0-based index of the page's first item
    let page_items: Vec<Value> = items
        .iter()
        .skip(first as usize)
        .take(page_size as usize)
        .cloned()
        .collect();
    // ItemRange = 1-based numbers of the first and last item on the page. For an empty page the
    // formula gives [first, first - 1]: real OrderCloud's value there is unconfirmed.
    let item_range = [first + 1, first + page_items.len() as u64];
    Json(json!({
        "Meta": {
            "Page": page,
            "PageSize": page_size,
            "TotalCount": total,
            "TotalPages": total_pages,
            "ItemRange": item_range,
        },
        "Items": page_items,
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Self-tests of the fake (part of the `it` binary)
// ---------------------------------------------------------------------------------------------

fn test_line(i: usize) -> Value {
    json!({"ID": format!("L{i}"), "ProductID": format!("P{i}"), "Quantity": 1, "UnitPrice": 2.5, "xp": {}})
}

async fn fetch(fake: &OrderCloudFake, token: Option<&str>, path: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("{}{}", fake.base_url(), path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn ordercloud_fake_tokens_and_me() {
    let fake = OrderCloudFake::start().await;
    fake.add_user("buyer1", "user42", "jane", "jane@example.com", "Jane", "Doe");
    fake.register_token("tok-jane", "jane");
    fake.register_anon_token("tok-anon", "O-ANON");

    let (status, body) = fetch(&fake, None, "/v1/me").await;
    assert_eq!(status, 401);
    assert_eq!(body["Errors"][0]["ErrorCode"], "InvalidToken");
    assert_eq!(fetch(&fake, Some("nope"), "/v1/me").await.0, 401);

    let (status, me) = fetch(&fake, Some("tok-jane"), "/v1/me").await;
    assert_eq!(status, 200);
    assert_eq!(
        (me["Buyer"]["ID"].as_str(), me["ID"].as_str()),
        (Some("buyer1"), Some("user42"))
    );
    assert_eq!(me["Email"], "jane@example.com");
    let (_, anon) = fetch(&fake, Some("tok-anon"), "/v1/me").await;
    assert_eq!(anon["Username"], "anon-template");
    assert_eq!(anon["Buyer"]["ID"], ANON_BUYER_ID);

    fake.expire_token("tok-jane");
    let (status, body) = fetch(&fake, Some("tok-jane"), "/v1/me").await;
    assert_eq!(status, 401);
    assert_eq!(body["Errors"][0]["Message"], "Access token is invalid or expired.");
}

#[tokio::test]
async fn ordercloud_fake_cart_submit_and_transfer() {
    let fake = OrderCloudFake::start().await;
    fake.add_user("buyer1", "user42", "jane", "jane@example.com", "Jane", "Doe");
    fake.register_token("tok-jane", "jane");
    fake.register_anon_token("tok-anon", "O-ANON");

    let (status, body) = fetch(&fake, Some("tok-anon"), "/v1/cart").await;
    assert_eq!(status, 404);
    assert_eq!(body["Errors"][0]["ErrorCode"], "NotFound");

    fake.set_cart(
        "tok-anon",
        json!({"ID": "O-ANON", "Status": "Unsubmitted"}),
        vec![test_line(1)],
    );
    assert_eq!(fetch(&fake, Some("tok-anon"), "/v1/cart").await.1["ID"], "O-ANON");
    assert_eq!(
        fetch(&fake, Some("tok-jane"), "/v1/orders/Outgoing/O-ANON/lineitems")
            .await
            .0,
        404,
        "not hers"
    );

    fake.transfer_order("O-ANON", "tok-jane");
    assert_eq!(fetch(&fake, Some("tok-anon"), "/v1/cart").await.0, 404);
    assert_eq!(fetch(&fake, Some("tok-jane"), "/v1/cart").await.1["ID"], "O-ANON");

    fake.submit("O-ANON");
    assert_eq!(
        fetch(&fake, Some("tok-jane"), "/v1/cart").await.0,
        404,
        "a submitted order is no cart"
    );
    // Direction is case-insensitive; the submitted order's lines stay readable.
    let (status, page) = fetch(&fake, Some("tok-jane"), "/v1/orders/outgoing/O-ANON/lineitems").await;
    assert_eq!(status, 200);
    assert_eq!(page["Items"][0]["ID"], "L1");
    assert_eq!(
        fetch(&fake, Some("tok-jane"), "/v1/orders/Incoming/O-ANON/lineitems")
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn ordercloud_fake_pages_line_items() {
    let fake = OrderCloudFake::start().await;
    fake.register_anon_token("tok-anon", "O1");
    fake.set_cart("tok-anon", json!({"ID": "O1"}), (1..=45).map(test_line).collect());

    let (_, first) = fetch(&fake, Some("tok-anon"), "/v1/cart/lineitems").await;
    assert_eq!(
        first["Meta"],
        json!({"Page":1,"PageSize":20,"TotalCount":45,"TotalPages":3,"ItemRange":[1,20]})
    );
    assert_eq!(first["Items"].as_array().unwrap().len(), 20);

    let (_, last) = fetch(
        &fake,
        Some("tok-anon"),
        "/v1/orders/Outgoing/O1/lineitems?page=3&pageSize=20",
    )
    .await;
    assert_eq!(last["Meta"]["ItemRange"], json!([41, 45]));
    assert_eq!(last["Items"][4]["ID"], "L45");

    let (_, all) = fetch(
        &fake,
        Some("tok-anon"),
        "/v1/orders/Outgoing/O1/lineitems?page=1&pageSize=100",
    )
    .await;
    assert_eq!(
        (
            all["Meta"]["TotalPages"].as_u64(),
            all["Items"].as_array().unwrap().len()
        ),
        (Some(1), 45)
    );

    let (status, body) = fetch(&fake, Some("tok-anon"), "/v1/cart/lineitems?pageSize=101").await;
    assert_eq!(status, 400);
    assert!(body["Errors"][0]["ErrorCode"].is_string());

    fake.set_lines("O1", vec![]);
    let (_, empty) = fetch(&fake, Some("tok-anon"), "/v1/cart/lineitems").await;
    assert_eq!(
        (
            empty["Meta"]["TotalCount"].as_u64(),
            empty["Meta"]["TotalPages"].as_u64()
        ),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn ordercloud_fake_scripts_delay_and_records_calls() {
    let fake = OrderCloudFake::start().await;
    fake.register_anon_token("tok-anon", "O1");
    fake.set_cart("tok-anon", json!({"ID": "O1"}), vec![test_line(1)]);
    fake.script(vec![503, 500]);
    assert_eq!(fetch(&fake, Some("tok-anon"), "/v1/cart").await.0, 503);
    assert_eq!(
        fetch(&fake, None, "/v1/cart").await.0,
        500,
        "scripts answer before authentication"
    );
    assert_eq!(fetch(&fake, Some("tok-anon"), "/v1/cart").await.0, 200);

    fake.set_delay(Duration::from_millis(300));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let timed_out = client
        .get(format!("{}/v1/me", fake.base_url()))
        .bearer_auth("tok-anon")
        .send()
        .await;
    assert!(timed_out.is_err_and(|e| e.is_timeout()));

    assert_eq!(
        fake.calls(),
        vec!["GET /v1/cart", "GET /v1/cart", "GET /v1/cart", "GET /v1/me"],
        "every call is recorded, scripted or not"
    );
}
