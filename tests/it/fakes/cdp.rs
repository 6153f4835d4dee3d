//! A fake Sitecore CDP Stream API (v1.2), built from `cdp.md` §2–9 and §11.
//!
//! What it models, and why:
//! - Only browser IDs minted by `browser/create` are accepted; others get 404 (§3, §5).
//! - The client key is the only credential: query on GET, body on POST (§4); wrong → 401 (§5).
//! - 201 is NOT proof of effect (§5): an event can be answered 201 and still end `FAILED`
//!   ([`CdpFake::failed_events`]) or be silently dropped because of a wrong `pos` ([`CdpFake::lost_events`]).
//! - The cart lives in a session keyed by channel + browser ID, closed after the point of sale's
//!   inactivity timeout (§6). ADD upserts by `item_id` (§7.3); CONFIRM must list items ADDed in the
//!   same session (§7.4, §8, §9); CHECKOUT turns the session cart into an order (§7.5, §8).
//! - A session that closes with lines, no order and no CLEAR_CART is an abandoned cart (§11).
//!
//! Time is real (`std::time::Instant`): tests use a short session timeout and sleep past it.
//! Sessions are closed lazily, on the next event or when a test asks ([`CdpFake::abandoned_carts`],
//! [`CdpFake::finish`]).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// A scripted answer to one event request (or one `browser/create`).
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    /// Sent as the `Retry-After` header when set.
    pub retry_after: Option<String>,
    /// Sent as the `Location` header when set (redirects).
    pub location: Option<String>,
    /// Response body; default `{"error_msg":"scripted <status>"}` for non-2xx.
    pub body: Option<Value>,
    /// When the answer comes (event requests only).
    pub hold: Hold,
    /// A non-2xx status answered after the event was processed (a gateway that lost CDP's answer):
    /// the caller cannot tell whether CDP took the event.
    pub processed: bool,
}

/// How long an event request waits for its answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hold {
    /// At once.
    No,
    /// After this long; the event is processed then, as if it had arrived then.
    For(Duration),
    /// Never: the request is recorded (answered 0) and neither processed nor answered, as when CDP
    /// hangs (the caller's timeout, or its death, ends it).
    Forever,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            retry_after: None,
            location: None,
            body: None,
            hold: Hold::No,
            processed: false,
        }
    }

    pub fn retry_after(status: u16, value: &str) -> Answer {
        Answer {
            retry_after: Some(value.to_string()),
            ..Answer::status(status)
        }
    }

    /// A redirect to `location`: the event is not processed.
    pub fn redirect(status: u16, location: &str) -> Answer {
        Answer {
            location: Some(location.to_string()),
            ..Answer::status(status)
        }
    }

    /// The request hangs: never processed, never answered.
    pub fn hang() -> Answer {
        Answer {
            hold: Hold::Forever,
            ..Answer::status(201)
        }
    }

    /// Processed normally, after `delay`.
    pub fn delayed(delay: Duration) -> Answer {
        Answer {
            hold: Hold::For(delay),
            ..Answer::status(201)
        }
    }

    /// The event is processed as CDP would, then `status` is answered instead of CDP's 201 (a
    /// gateway timeout after CDP took the event).
    pub fn processed_then(status: u16) -> Answer {
        Answer {
            processed: true,
            ..Answer::status(status)
        }
    }

    /// The same answer, given after `delay`.
    pub fn after(mut self, delay: Duration) -> Answer {
        self.hold = Hold::For(delay);
        self
    }

    /// Replaces the default body.
    pub fn with_body(mut self, body: Value) -> Answer {
        self.body = Some(body);
        self
    }
}

/// One event request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub at: Instant,
    /// `"post"` (`POST /v1.2/events`) or `"get"` (`GET /v1.2/event/create.json`).
    pub via: &'static str,
    /// The event JSON. For POST, `client_key` is removed so both styles record the same event.
    /// `Null` when the body/message was not JSON (then `failure` says so).
    pub event: Value,
    pub event_type: String,
    pub browser_id: String,
    pub channel: String,
    /// The shopper (identity) of the event, see [`CdpFake::script`].
    pub shopper: Option<String>,
    /// HTTP status the fake answered.
    pub answered: u16,
    /// Why the event was refused (4xx/scripted), FAILED (`"FAILED: …"`) or lost (`"LOST: …"`);
    /// None when processed.
    pub failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OrderLine {
    pub item_id: String,
    pub quantity: f64,
    /// Unit price.
    pub price: f64,
}

#[derive(Clone, Debug)]
pub struct Order {
    pub reference_id: String,
    pub status: String,
    pub browser_id: String,
    pub channel: String,
    pub shopper: Option<String>,
    /// Sorted by `item_id`.
    pub lines: Vec<OrderLine>,
    /// Σ quantity × price, rounded to cents (ORDER_CHECKOUT: `order.price`, rounded).
    pub revenue: f64,
    /// `"checkout"` (ADD → CONFIRM → CHECKOUT) or `"order_checkout"` (single event).
    pub via: &'static str,
}

#[derive(Clone, Debug)]
pub struct AbandonedCart {
    pub browser_id: String,
    pub channel: String,
    /// The browser's identity when the session closed. §11: "The guest must be identified in order
    /// for this to work", so a test about abandonment triggers should assert this is `Some`.
    pub shopper: Option<String>,
    /// Sorted by `item_id`.
    pub lines: Vec<OrderLine>,
    /// Σ latest quantity × price per item_id, rounded to cents (§7.3, §11).
    pub revenue: f64,
}

// ---------------------------------------------------------------------------------------------
// The fake
// ---------------------------------------------------------------------------------------------

pub struct CdpFake {
    addr: SocketAddr,
    state: Arc<Mutex<CdpState>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for CdpFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl CdpFake {
    /// Starts the fake on 127.0.0.1:0 inside the current tokio runtime. `pos` is the only point of
    /// sale that exists (§5: any other `pos` is answered 201 and lost); `session_timeout` is the
    /// point of sale's "Timeout (in minutes)" (§6), shortened for tests.
    pub async fn start(client_key: &str, pos: &str, session_timeout: Duration) -> CdpFake {
        let state = Arc::new(Mutex::new(CdpState::new(client_key, pos, session_timeout)));
        let app = Router::new()
            .route("/v1.2/browser/create.json", get(browser_create))
            .route("/v1.2/event/create.json", get(event_get))
            .route("/v1.2/events", post(event_post))
            .route("/v2.1/orders", get(rest_orders))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind CDP fake");
        let addr = listener.local_addr().expect("CDP fake address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CdpFake { addr, state, server }
    }

    /// `http://127.0.0.1:PORT`, without `/v1.2`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, CdpState> {
        lock(&self.state)
    }

    /// The next event requests whose shopper is `identity` (the `identifiers[0].id` of an IDENTITY,
    /// else the identity last sent by an IDENTITY on the same browser) are answered from `answers`,
    /// one per request. A non-2xx answer does not process the event; a 2xx answer processes it
    /// normally and replaces the status (and body, if given) of a 201.
    pub fn script(&self, identity: &str, answers: Vec<Answer>) {
        self.lock()
            .scripts
            .entry(identity.to_string())
            .or_default()
            .extend(answers);
    }

    /// Like [`CdpFake::script`] for every event request; consulted before the per-identity scripts.
    pub fn script_all(&self, answers: Vec<Answer>) {
        self.lock().script_all.extend(answers);
    }

    /// Drops whatever is left of the every-request script (CDP is back).
    pub fn clear_script_all(&self) {
        self.lock().script_all.clear();
    }

    /// Scripts the next `browser/create` answers (checked after the client key). Not in the brief:
    /// lets a test make browser minting fail (e.g. 503) without failing events.
    pub fn script_browser_create(&self, answers: Vec<Answer>) {
        self.lock().script_browser_create.extend(answers);
    }

    /// Forgets a browser ID: later events on it get 404 (§5, "unknown browser_id").
    pub fn forget_browser(&self, browser_id: &str) {
        self.lock().browsers.remove(browser_id);
    }

    /// How many browser IDs `browser/create` minted (scripted failures excluded).
    pub fn browsers_created(&self) -> usize {
        self.lock().browsers_created
    }

    /// Every event request, in arrival order, whatever the answer.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// How many requests of this event type came, whatever the answer: a duplicate counts twice.
    pub fn sent(&self, event_type: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.event_type == event_type)
            .count()
    }

    /// The REST API accepts HTTP Basic `client_key:token` from now on.
    pub fn set_api_token(&self, token: &str) {
        self.lock().api_token = Some(token.to_string());
    }

    /// The next `times` CHECKOUTs of order `reference` are answered 201 and build no order.
    pub fn lose_order(&self, reference: &str, times: usize) {
        self.lock().lose_orders.insert(reference.to_string(), times);
    }

    /// The REST API answers 503 (down) or works again.
    /// `GET /v2.1/orders` answered by something that is not CDP's REST API (a proxy, a wrong path):
    /// 404 with an HTML page.
    pub fn set_rest_not_found_page(&self, on: bool) {
        self.lock().rest_not_found_page = on;
    }

    /// Event requests being held by a `delayed` answer now (in flight, not answered yet).
    pub fn held(&self) -> usize {
        self.lock().held
    }

    pub fn set_rest_down(&self, down: bool) {
        self.lock().rest_down = down;
    }

    /// REST calls received, e.g. `"GET /v2.1/orders?referenceId=O1"`.
    pub fn rest_calls(&self) -> Vec<String> {
        self.lock().rest_calls.clone()
    }

    /// Orders built so far, in order of creation.
    pub fn orders(&self) -> Vec<Order> {
        self.lock().orders.clone()
    }

    /// Closes every open session (as if the test ended and every POS timeout elapsed) and returns
    /// the abandoned carts of all closed sessions, by timeout or by `finish`, in closing order.
    pub fn finish(&self) -> Vec<AbandonedCart> {
        let mut st = self.lock();
        st.sweep(Instant::now());
        let mut open: Vec<_> = st.sessions.drain().collect();
        // Deterministic closing order: oldest activity first.
        open.sort_by_key(|(_, s)| s.last_event_at);
        for ((channel, browser_id), session) in open {
            st.close(channel, browser_id, session, ClosedBy::Finish);
        }
        st.closed.iter().map(|(cart, _)| cart.clone()).collect()
    }

    /// How many sessions are open now (expired ones are closed first).
    pub fn open_sessions(&self) -> usize {
        let mut st = self.lock();
        st.sweep(Instant::now());
        st.sessions.len()
    }

    /// Abandoned carts of sessions already closed by the inactivity timeout (checked now).
    pub fn abandoned_carts(&self) -> Vec<AbandonedCart> {
        let mut st = self.lock();
        st.sweep(Instant::now());
        st.closed
            .iter()
            .filter(|(_, by)| *by == ClosedBy::Timeout)
            .map(|(cart, _)| cart.clone())
            .collect()
    }

    /// Events answered 201 that CDP would end as `FAILED` (§5, §8): invalid fields, CONFIRM of items
    /// not ADDed in the session, CHECKOUT without a valid CONFIRM, ORDER_CHECKOUT without IDENTITY…
    pub fn failed_events(&self) -> Vec<Request> {
        self.lock().failed.clone()
    }

    /// Events answered 201 with a `pos` other than the configured one: "data silently lost" (§5).
    pub fn lost_events(&self) -> Vec<Request> {
        self.lock().lost.clone()
    }
}

fn lock(state: &Mutex<CdpState>) -> MutexGuard<'_, CdpState> {
    // A panicking test must not hide its own failure behind a poisoned-mutex panic.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum ClosedBy {
    Timeout,
    Finish,
}

/// What a CONFIRM left in the session (§7.4, §8).
#[derive(Clone, Debug)]
enum Confirm {
    /// `product` was an array of `{"item_id"}`, every one ADDed in this session.
    Items(Vec<String>),
    /// `product` was an object: "Sitecore CDP will accept it … But CHECKOUT event will fail" (§8).
    ObjectForm,
}

#[derive(Clone, Copy, Debug)]
struct CartLine {
    quantity: f64,
    price: f64,
}

/// A stream session: channel + browser ID (§6). No "open" call: the first event opens it.
struct Session {
    /// Keyed by `product.item_id` (§7.3); BTreeMap keeps lines sorted.
    cart: BTreeMap<String, CartLine>,
    confirm: Option<Confirm>,
    /// An order was built in this session: cart type CONVERTED, never ABANDONED (§11).
    converted: bool,
    /// The last processed event was CLEAR_CART: cart type CLOSED, not ABANDONED (§11).
    last_was_clear: bool,
    last_event_at: Instant,
}

impl Session {
    fn new(now: Instant) -> Session {
        Session {
            cart: BTreeMap::new(),
            confirm: None,
            converted: false,
            last_was_clear: false,
            last_event_at: now,
        }
    }
}

struct CdpState {
    client_key: String,
    pos: String,
    session_timeout: Duration,
    /// Browser IDs minted by `browser/create` and not forgotten.
    browsers: HashSet<String>,
    browsers_created: usize,
    /// browser ID → identity of the last processed IDENTITY on it (any channel).
    identities: HashMap<String, String>,
    /// Open sessions by (channel, browser ID).
    sessions: HashMap<(String, String), Session>,
    /// Abandoned carts of closed sessions, in closing order.
    closed: Vec<(AbandonedCart, ClosedBy)>,
    script_all: VecDeque<Answer>,
    scripts: HashMap<String, VecDeque<Answer>>,
    script_browser_create: VecDeque<Answer>,
    requests: Vec<Request>,
    orders: Vec<Order>,
    failed: Vec<Request>,
    lost: Vec<Request>,
    /// The REST API's token (HTTP Basic `client_key:api_token`, §15); none: every REST call is 401.
    api_token: Option<String>,
    /// Order references whose next CHECKOUTs are acknowledged (201) but build no order (§13 item 4):
    /// how many more to lose.
    lose_orders: HashMap<String, usize>,
    /// REST calls received: `GET /v2.1/orders?referenceId=…`.
    rest_calls: Vec<String>,
    /// The REST API answers 503 to everything while set.
    rest_down: bool,
    rest_not_found_page: bool,
    /// Event requests held by a `delayed` answer right now.
    held: usize,
}

/// The outcome of an event that passed the client-key and JSON checks.
enum Verdict {
    /// Refused with an HTTP error (400/404).
    Refused(u16, String),
    /// 201, then FAILED: nothing applied.
    Failed(String),
    /// 201, wrong `pos`: nothing applied, nothing visible.
    Lost(String),
    /// 201 and applied.
    Processed,
}

struct Reply {
    status: u16,
    body: Value,
    retry_after: Option<String>,
    location: Option<String>,
}

impl Reply {
    fn error(status: u16, msg: &str) -> Reply {
        Reply {
            status,
            body: json!({ "error_msg": msg }),
            retry_after: None,
            location: None,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body)).into_response();
        if let Some(value) = self.retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if let Some(value) = self.location.and_then(|v| HeaderValue::from_str(&v).ok()) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        response
    }
}

impl CdpState {
    fn new(client_key: &str, pos: &str, session_timeout: Duration) -> CdpState {
        CdpState {
            client_key: client_key.to_string(),
            pos: pos.to_string(),
            session_timeout,
            browsers: HashSet::new(),
            browsers_created: 0,
            identities: HashMap::new(),
            sessions: HashMap::new(),
            closed: Vec::new(),
            script_all: VecDeque::new(),
            scripts: HashMap::new(),
            script_browser_create: VecDeque::new(),
            requests: Vec::new(),
            orders: Vec::new(),
            failed: Vec::new(),
            lost: Vec::new(),
            api_token: None,
            lose_orders: HashMap::new(),
            rest_calls: Vec::new(),
            rest_down: false,
            rest_not_found_page: false,
            held: 0,
        }
    }

    /// Closes every session idle for longer than the POS timeout (§6).
    fn sweep(&mut self, now: Instant) {
        let timeout = self.session_timeout;
        let mut expired: Vec<(String, String)> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_event_at) > timeout)
            .map(|(key, _)| key.clone())
            .collect();
        expired.sort_by_key(|key| self.sessions[key].last_event_at);
        for key in expired {
            if let Some(session) = self.sessions.remove(&key) {
                self.close(key.0, key.1, session, ClosedBy::Timeout);
            }
        }
    }

    /// §11: lines added, session closes without an order and without CLEAR_CART → ABANDONED.
    fn close(&mut self, channel: String, browser_id: String, session: Session, by: ClosedBy) {
        if session.cart.is_empty() || session.converted || session.last_was_clear {
            return;
        }
        let lines = cart_lines(&session.cart);
        let revenue = cents(lines.iter().map(|l| l.quantity * l.price).sum());
        let shopper = self.identities.get(&browser_id).cloned();
        self.closed.push((
            AbandonedCart {
                browser_id,
                channel,
                shopper,
                lines,
                revenue,
            },
            by,
        ));
    }

    /// "Shopper of an event": IDENTITY → its `identifiers[0].id`; else the browser's last identity.
    fn shopper_of(&self, event: &Value) -> Option<String> {
        if str_field(event, "type") == Some("IDENTITY") {
            if let Some(id) = event.pointer("/identifiers/0/id").and_then(Value::as_str) {
                return Some(id.to_string());
            }
        }
        self.identities.get(str_field(event, "browser_id")?).cloned()
    }

    fn take_script(&mut self, shopper: Option<&str>) -> Option<Answer> {
        if let Some(answer) = self.script_all.pop_front() {
            return Some(answer);
        }
        self.scripts.get_mut(shopper?)?.pop_front()
    }

    /// Records one event request.
    fn record(
        &mut self,
        via: &'static str,
        event: Value,
        shopper: Option<String>,
        answered: u16,
        failure: Option<String>,
        at: Instant,
    ) -> Request {
        let request = Request {
            at,
            via,
            event_type: str_field(&event, "type").unwrap_or_default().to_string(),
            browser_id: str_field(&event, "browser_id").unwrap_or_default().to_string(),
            channel: str_field(&event, "channel").unwrap_or_default().to_string(),
            shopper,
            answered,
            failure,
            event,
        };
        self.requests.push(request.clone());
        request
    }

    /// Refuses a request before processing (wrong client key, not JSON, unsupported media type).
    fn refuse(&mut self, via: &'static str, event: Value, status: u16, msg: &str, at: Instant) -> Reply {
        let shopper = self.shopper_of(&event);
        self.record(via, event, shopper, status, Some(msg.to_string()), at);
        Reply::error(status, msg)
    }

    /// Steps 2–5 of event processing (the client key and JSON were checked by the handler), with
    /// the scripted answer taken for this request, if any.
    fn process(&mut self, via: &'static str, event: Value, scripted: Option<Answer>, now: Instant) -> Reply {
        let shopper = self.shopper_of(&event);
        if let Some(answer) = &scripted {
            if !(200..300).contains(&answer.status) && !answer.processed {
                // A scripted error answers instead of CDP: the event is not processed.
                let msg = format!("scripted {}", answer.status);
                let body = answer.body.clone().unwrap_or_else(|| json!({ "error_msg": msg }));
                self.record(via, event, shopper, answer.status, Some(msg), now);
                return Reply {
                    status: answer.status,
                    body,
                    retry_after: answer.retry_after.clone(),
                    location: answer.location.clone(),
                };
            }
        }

        let verdict = self.evaluate(&event, shopper.clone(), now);
        let (mut reply, failure) = match &verdict {
            Verdict::Refused(status, msg) => (Reply::error(*status, msg), Some(msg.clone())),
            Verdict::Failed(msg) => (self.created(), Some(format!("FAILED: {msg}"))),
            Verdict::Lost(msg) => (self.created(), Some(format!("LOST: {msg}"))),
            Verdict::Processed => (self.created(), None),
        };
        // A scripted 2xx (or a status answered after processing) replaces the 201 of an event that
        // was accepted.
        if let (Some(answer), 201) = (&scripted, reply.status) {
            reply.status = answer.status;
            reply.retry_after = answer.retry_after.clone();
            if let Some(body) = &answer.body {
                reply.body = body.clone();
            }
        }
        let recorded = self.record(via, event, shopper, reply.status, failure, now);
        match verdict {
            Verdict::Failed(_) => self.failed.push(recorded),
            Verdict::Lost(_) => self.lost.push(recorded),
            Verdict::Refused(..) | Verdict::Processed => {}
        }
        reply
    }

    /// The 201 body of an accepted event (§5: starts `{"status":"OK","version":"1.2",…}`).
    fn created(&self) -> Reply {
        Reply {
            status: 201,
            body: json!({
                "status": "OK",
                "version": "1.2",
                "ref": uuid::Uuid::new_v4().to_string(),
                "client_key": self.client_key,
            }),
            retry_after: None,
            location: None,
        }
    }

    fn evaluate(&mut self, event: &Value, shopper: Option<String>, now: Instant) -> Verdict {
        // §5: "event lacks browser_id or type" → 400; unknown browser_id → 404.
        let Some(browser_id) = nonempty_str(event, "browser_id").map(str::to_string) else {
            return Verdict::Refused(400, "browser_id is required".into());
        };
        let Some(event_type) = nonempty_str(event, "type").map(str::to_string) else {
            return Verdict::Refused(400, "type is required".into());
        };
        if !self.browsers.contains(&browser_id) {
            return Verdict::Refused(404, "browser not found".into());
        }
        self.sweep(now);

        // §5: a pos that is not an existing point of sale → 201 and "data silently lost".
        match event.get("pos").and_then(Value::as_str) {
            None => return Verdict::Failed("pos is required (§7.1)".into()),
            Some(pos) if pos != self.pos => {
                return Verdict::Lost(format!("pos {pos:?} is not a point of sale (§5)"));
            }
            Some(_) => {}
        }
        if let Err(msg) = check_base_fields(event) {
            return Verdict::Failed(msg);
        }
        if !is_upper_name(&event_type) {
            return Verdict::Failed(format!("type {event_type:?} must be upper case (§7.1)"));
        }
        let channel = str_field(event, "channel").unwrap_or_default().to_string();

        let identified = self.identities.contains_key(&browser_id);
        let mut new_identity = None;
        let session = self
            .sessions
            .entry((channel.clone(), browser_id.clone()))
            .or_insert_with(|| Session::new(now));
        let outcome: Result<Option<Order>, String> = match event_type.as_str() {
            "IDENTITY" => check_identity(event).map(|id| {
                new_identity = Some(id);
                None
            }),
            "ADD" => apply_add(session, event).map(|_| None),
            "CLEAR_CART" => {
                // §7.7: removes all products from the cart.
                session.cart.clear();
                session.confirm = None;
                Ok(None)
            }
            "CONFIRM" => apply_confirm(session, event).map(|_| None),
            "CHECKOUT" => apply_checkout(session, event, &browser_id, &channel, shopper.clone()).map(Some),
            "ORDER_CHECKOUT" => {
                apply_order_checkout(session, event, identified, &browser_id, &channel, shopper.clone()).map(Some)
            }
            // VIEW, custom events, …: accepted, nothing to model.
            _ => Ok(None),
        };
        match outcome {
            Err(msg) => Verdict::Failed(msg),
            Ok(order) => {
                // Only processed events count as session activity in this fake.
                session.last_event_at = now;
                session.last_was_clear = event_type == "CLEAR_CART";
                if let Some(order) = order {
                    match self.lose_orders.get_mut(&order.reference_id) {
                        // 201, and no order is built.
                        Some(left) if *left > 0 => *left -= 1,
                        _ => self.orders.push(order),
                    }
                }
                if let Some(identity) = new_identity {
                    self.identities.insert(browser_id, identity);
                }
                Verdict::Processed
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Event rules
// ---------------------------------------------------------------------------------------------

/// §7.1: channel, language, currency, page, pos on every event (pos checked by the caller), plus
/// the optional `ext` (§7.10) and `session_data` (§7.11) shapes.
fn check_base_fields(event: &Value) -> Result<(), String> {
    match event.get("channel").and_then(Value::as_str) {
        Some(c) if is_upper_name(c) => {}
        other => {
            return Err(format!(
                "channel {other:?} must be an upper-case string, e.g. WEB (§7.1)"
            ))
        }
    }
    match event.get("language").and_then(Value::as_str) {
        Some(l) if is_upper_code(l, 2) => {}
        other => {
            return Err(format!(
                "language {other:?} must be 2 upper-case letters, e.g. EN (§7.1)"
            ))
        }
    }
    match event.get("currency").and_then(Value::as_str) {
        Some(c) if is_upper_code(c, 3) => {}
        other => {
            return Err(format!(
                "currency {other:?} must be 3 upper-case letters, e.g. EUR (§7.1)"
            ))
        }
    }
    if !event.get("page").is_some_and(Value::is_string) {
        return Err("page is required and must be a string (§7.1)".into());
    }
    if let Some(ext) = event.get("ext") {
        let obj = ext.as_object().ok_or("ext must be an object (§7.10)")?;
        if obj.len() > 50 {
            return Err(format!("ext has {} attributes, max 50 (§7.10)", obj.len()));
        }
        if let Some((k, _)) = obj.iter().find(|(_, v)| !is_flat_value(v)) {
            return Err(format!(
                "ext.{k} must be a string, boolean or number: no nesting (§7.10)"
            ));
        }
    }
    if let Some(data) = event.get("session_data") {
        let obj = data.as_object().ok_or("session_data must be a flat object (§7.11)")?;
        if let Some((k, _)) = obj.iter().find(|(_, v)| !is_flat_value(v)) {
            return Err(format!("session_data.{k} must be a string, boolean or number (§7.11)"));
        }
    }
    Ok(())
}

/// §7.2: `identifiers` is a required non-empty array of `{provider, id}` strings. Returns the
/// identity (`identifiers[0].id`).
fn check_identity(event: &Value) -> Result<String, String> {
    let identifiers = event
        .get("identifiers")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or("identifiers must be a non-empty array (§7.2)")?;
    for (i, identifier) in identifiers.iter().enumerate() {
        for field in ["provider", "id"] {
            if nonempty_str(identifier, field).is_none() {
                return Err(format!("identifiers[{i}].{field} must be a non-empty string (§7.2)"));
            }
        }
        if identifier.get("expiry_date").is_some_and(|d| !d.is_string()) {
            return Err(format!("identifiers[{i}].expiry_date must be a string (§7.2)"));
        }
    }
    // `street` is documented as an array of strings (§7.2).
    if let Some(street) = event.get("street") {
        if !street.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
            return Err("street must be an array of strings (§7.2)".into());
        }
    }
    Ok(identifiers[0]["id"].as_str().unwrap_or_default().to_string())
}

/// §7.3: validates `product` and upserts the session's cart line by `item_id`.
fn apply_add(session: &mut Session, event: &Value) -> Result<(), String> {
    let product = event
        .get("product")
        .filter(|p| p.is_object())
        .ok_or("product must be an object (§7.3)")?;
    match product.get("type").and_then(Value::as_str) {
        Some(t) if is_upper_name(t) => {}
        other => return Err(format!("product.type {other:?} must be an upper-case string (§7.3)")),
    }
    let item_id = nonempty_str(product, "item_id").ok_or("product.item_id must be a non-empty string (§7.3)")?;
    for field in ["name", "productId"] {
        if !product.get(field).is_some_and(Value::is_string) {
            return Err(format!("product.{field} must be a string (§7.3)"));
        }
    }
    match product.get("orderedAt").and_then(Value::as_str) {
        Some(at) if chrono::DateTime::parse_from_rfc3339(at).is_ok() => {}
        other => {
            return Err(format!(
                "product.orderedAt {other:?} must be an ISO 8601 date-time string (§7.3)"
            ))
        }
    }
    // §13.1: prices and quantities must be JSON numbers (a string price gives a zero amount).
    let quantity = product
        .get("quantity")
        .and_then(Value::as_f64)
        .filter(|q| q.fract() == 0.0)
        .ok_or("product.quantity must be an integer JSON number (§7.3, §13)")?;
    let price = product
        .get("price")
        .and_then(Value::as_f64)
        .ok_or("product.price must be a JSON number (§7.3, §13)")?;
    match product.get("currency").and_then(Value::as_str) {
        Some(c) if is_upper_code(c, 3) => {}
        other => {
            return Err(format!(
                "product.currency {other:?} must be 3 upper-case letters (§7.3)"
            ))
        }
    }
    if product.get("originalPrice").is_some_and(|p| !p.is_number()) {
        return Err("product.originalPrice must be a JSON number (§7.3)".into());
    }
    for field in ["originalCurrencyCode", "referenceId"] {
        if product.get(field).is_some_and(|v| !v.is_string()) {
            return Err(format!("product.{field} must be a string (§7.3)"));
        }
    }
    // "later ADD events as an update to that line. The latest quantity and price values are used".
    session.cart.insert(item_id.to_string(), CartLine { quantity, price });
    Ok(())
}

/// §7.4: `product` is an array of `{"item_id"}`, each ADDed earlier in this session. An object is
/// accepted but poisons the next CHECKOUT (§8).
fn apply_confirm(session: &mut Session, event: &Value) -> Result<(), String> {
    match event.get("product") {
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err("product must list at least one item_id (§7.4)".into());
            }
            let mut ids = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let id = nonempty_str(item, "item_id")
                    .ok_or_else(|| format!("product[{i}].item_id must be a non-empty string (§7.4)"))?;
                if !session.cart.contains_key(id) {
                    return Err(format!(
                        "product[{i}].item_id {id:?} has no ADD in this session (§7.4, §8, §9)"
                    ));
                }
                ids.push(id.to_string());
            }
            session.confirm = Some(Confirm::Items(ids));
            Ok(())
        }
        Some(Value::Object(_)) => {
            session.confirm = Some(Confirm::ObjectForm);
            Ok(())
        }
        _ => Err("product must be an array of {\"item_id\"} objects (§7.4)".into()),
    }
}

const CHECKOUT_STATUSES: [&str; 5] = ["PURCHASED", "PAYMENT_PENDING", "CONFIRMED", "REFUNDED", "CANCELLED"];

/// §7.5, §8: turns the session cart into an order when a valid CONFIRM precedes it.
fn apply_checkout(
    session: &mut Session,
    event: &Value,
    browser_id: &str,
    channel: &str,
    shopper: Option<String>,
) -> Result<Order, String> {
    let reference_id = nonempty_str(event, "reference_id").ok_or("reference_id must be a non-empty string (§7.5)")?;
    let status = event
        .get("status")
        .and_then(Value::as_str)
        .filter(|s| CHECKOUT_STATUSES.contains(s))
        .ok_or_else(|| format!("status must be one of {CHECKOUT_STATUSES:?} (§7.5)"))?;
    let confirmed = match &session.confirm {
        None => return Err("no CONFIRM in this session before CHECKOUT (§8)".into()),
        Some(Confirm::ObjectForm) => {
            return Err("the session's CONFIRM product was an object, not an array (§8)".into())
        }
        Some(Confirm::Items(ids)) => ids.clone(),
    };
    let mut lines = Vec::new();
    for id in confirmed {
        let line = session
            .cart
            .get(&id)
            .ok_or_else(|| format!("confirmed item_id {id:?} is no longer in the cart"))?;
        lines.push(OrderLine {
            item_id: id,
            quantity: line.quantity,
            price: line.price,
        });
    }
    lines.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    lines.dedup_by(|a, b| a.item_id == b.item_id);
    let revenue = cents(lines.iter().map(|l| l.quantity * l.price).sum());
    // §11: a session with an order is CONVERTED; the cart became the order.
    session.converted = true;
    session.cart.clear();
    session.confirm = None;
    Ok(Order {
        reference_id: reference_id.to_string(),
        status: status.to_string(),
        browser_id: browser_id.to_string(),
        channel: channel.to_string(),
        shopper,
        lines,
        revenue,
        via: "checkout",
    })
}

/// §7.6: single-event order; the guest must have been identified by an IDENTITY first.
fn apply_order_checkout(
    session: &mut Session,
    event: &Value,
    identified: bool,
    browser_id: &str,
    channel: &str,
    shopper: Option<String>,
) -> Result<Order, String> {
    if !identified {
        return Err("ORDER_CHECKOUT before any IDENTITY on this browser (§7.6)".into());
    }
    let order = event
        .get("order")
        .filter(|o| o.is_object())
        .ok_or("order must be an object (§7.6)")?;
    let reference_id =
        nonempty_str(order, "referenceId").ok_or("order.referenceId must be a non-empty string (§7.6)")?;
    match order.get("orderedAt").and_then(Value::as_str) {
        Some(at) if chrono::DateTime::parse_from_rfc3339(at).is_ok() => {}
        other => {
            return Err(format!(
                "order.orderedAt {other:?} must be an ISO 8601 date-time string (§7.6)"
            ))
        }
    }
    let status = order
        .get("status")
        .and_then(Value::as_str)
        .filter(|s| ["PURCHASED", "PAYMENT_PENDING"].contains(s))
        .ok_or("order.status must be PURCHASED or PAYMENT_PENDING (§7.6)")?;
    match order.get("currencyCode").and_then(Value::as_str) {
        Some(c) if is_upper_code(c, 3) => {}
        other => {
            return Err(format!(
                "order.currencyCode {other:?} must be 3 upper-case letters (§7.6)"
            ))
        }
    }
    let price = order
        .get("price")
        .and_then(Value::as_f64)
        .ok_or("order.price must be a JSON number (§7.6)")?;
    let payment_type =
        nonempty_str(order, "paymentType").ok_or("order.paymentType must be a non-empty string (§7.6)")?;
    if payment_type.eq_ignore_ascii_case("Card") && nonempty_str(order, "cardType").is_none() {
        return Err("order.cardType is required when paymentType is \"Card\" (§7.6)".into());
    }
    let mut lines = Vec::new();
    match order.get("orderItems") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                lines.push(order_item_line(i, item)?);
            }
        }
        Some(_) => return Err("order.orderItems must be an array (§7.6)".into()),
    }
    lines.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    session.converted = true;
    Ok(Order {
        reference_id: reference_id.to_string(),
        status: status.to_string(),
        browser_id: browser_id.to_string(),
        channel: channel.to_string(),
        shopper,
        lines,
        revenue: cents(price),
        via: "order_checkout",
    })
}

/// `orderItems[]` fields are all optional (§7.6) but must have their documented types when sent.
fn order_item_line(i: usize, item: &Value) -> Result<OrderLine, String> {
    if !item.is_object() {
        return Err(format!("order.orderItems[{i}] must be an object (§7.6)"));
    }
    if let Some(t) = item.get("type") {
        if !t.as_str().is_some_and(is_upper_name) {
            return Err(format!(
                "order.orderItems[{i}].type must be an upper-case string (§7.6)"
            ));
        }
    }
    for field in ["referenceId", "orderedAt", "status", "name", "productId"] {
        if item.get(field).is_some_and(|v| !v.is_string()) {
            return Err(format!("order.orderItems[{i}].{field} must be a string (§7.6)"));
        }
    }
    for field in ["price", "quantity"] {
        if item.get(field).is_some_and(|v| !v.is_number()) {
            return Err(format!(
                "order.orderItems[{i}].{field} must be a JSON number (§7.6, §13)"
            ));
        }
    }
    if let Some(c) = item.get("currencyCode") {
        if !c.as_str().is_some_and(|c| is_upper_code(c, 3)) {
            return Err(format!(
                "order.orderItems[{i}].currencyCode must be 3 upper-case letters (§7.6)"
            ));
        }
    }
    let item_id = str_field(item, "productId")
        .or_else(|| str_field(item, "referenceId"))
        .unwrap_or_default();
    let quantity = item.get("quantity").and_then(Value::as_f64).unwrap_or(1.0);
    // `price` of an order item is the line price as sent (Headstart sends LineTotal): unit = line / quantity.
    let line_price = item.get("price").and_then(Value::as_f64).unwrap_or(0.0);
    let price = if quantity != 0.0 {
        line_price / quantity
    } else {
        line_price
    };
    Ok(OrderLine {
        item_id: item_id.to_string(),
        quantity,
        price,
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP handlers
// ---------------------------------------------------------------------------------------------

type Shared = Arc<Mutex<CdpState>>;

fn query_params(raw: Option<String>) -> HashMap<String, String> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// `GET /v1.2/browser/create.json?client_key=CK&message={}` (§2, §3).
async fn browser_create(State(state): State<Shared>, RawQuery(raw): RawQuery) -> Response {
    let params = query_params(raw);
    let mut st = lock(&state);
    if params.get("client_key") != Some(&st.client_key) {
        return Reply::error(401, "invalid client key").into_response();
    }
    let scripted = st.script_browser_create.pop_front();
    if let Some(answer) = &scripted {
        if !(200..300).contains(&answer.status) {
            let msg = format!("scripted {}", answer.status);
            let body = answer.body.clone().unwrap_or_else(|| json!({ "error_msg": msg }));
            return Reply {
                status: answer.status,
                body,
                retry_after: answer.retry_after.clone(),
                location: answer.location.clone(),
            }
            .into_response();
        }
    }
    let browser_id = uuid::Uuid::new_v4().to_string();
    st.browsers.insert(browser_id.clone());
    st.browsers_created += 1;
    // §3: the documented body; HTTP 201 per third-party code.
    let body = json!({
        "status": "OK",
        "version": "1.2",
        "client_key": st.client_key,
        "ref": browser_id,
        "customer_ref": uuid::Uuid::new_v4().to_string(),
    });
    let status = scripted.map_or(201, |a| a.status);
    Reply {
        status,
        body,
        retry_after: None,
        location: None,
    }
    .into_response()
}

/// An event request whose client key and JSON were checked: answered as scripted (at once, later,
/// or never), else processed.
async fn answer_event(state: &Shared, via: &'static str, event: Value, now: Instant) -> Response {
    let held = {
        let mut st = lock(state);
        let shopper = st.shopper_of(&event);
        let scripted = st.take_script(shopper.as_deref());
        match scripted {
            Some(
                answer @ Answer {
                    hold: Hold::For(delay), ..
                },
            ) => {
                st.held += 1;
                Some((delay, answer, event))
            }
            Some(Answer {
                hold: Hold::Forever, ..
            }) => {
                st.record(via, event, shopper, 0, Some("hung: never answered".into()), now);
                None
            }
            scripted => return st.process(via, event, scripted, now).into_response(),
        }
    };
    let Some((delay, answer, event)) = held else {
        return std::future::pending().await;
    };
    tokio::time::sleep(delay).await;
    let answer = Answer {
        hold: Hold::No,
        ..answer
    };
    let mut st = lock(state);
    st.held -= 1;
    st.process(via, event, Some(answer), Instant::now()).into_response()
}

/// `GET /v1.2/event/create.json?client_key=CK&message=<URL-encoded event JSON>` (§2, documented).
async fn event_get(State(state): State<Shared>, RawQuery(raw): RawQuery) -> Response {
    let now = Instant::now();
    let params = query_params(raw);
    let checked = {
        let mut st = lock(&state);
        let parsed = match params.get("message") {
            None => Err("message is required".to_string()),
            Some(m) => serde_json::from_str::<Value>(m).map_err(|e| format!("message is not JSON: {e}")),
        };
        let recorded = parsed.clone().unwrap_or(Value::Null);
        if params.get("client_key") != Some(&st.client_key) {
            Err(st.refuse("get", recorded, 401, "invalid client key", now))
        } else {
            match parsed {
                Ok(event) if event.is_object() => Ok(event),
                Ok(_) => Err(st.refuse("get", recorded, 400, "message must be a JSON object", now)),
                Err(msg) => Err(st.refuse("get", recorded, 400, &msg, now)),
            }
        }
    };
    match checked {
        Ok(event) => answer_event(&state, "get", event, now).await,
        Err(reply) => reply.into_response(),
    }
}

/// `POST /v1.2/events`, JSON body = event plus `client_key` (§2, Engage SDK style).
async fn event_post(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let now = Instant::now();
    let checked = {
        let mut st = lock(&state);
        // §5 (R): 415 unsupported media type; the SDK sends `Content-Type: application/json` (§2).
        let json_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/json"));
        let parsed = serde_json::from_slice::<Value>(&body);
        if !json_type {
            let recorded = parsed.unwrap_or(Value::Null);
            Err(st.refuse("post", recorded, 415, "Content-Type must be application/json", now))
        } else {
            match parsed {
                Ok(mut event) if event.is_object() => {
                    let client_key = event.as_object_mut().and_then(|o| o.remove("client_key"));
                    if client_key.as_ref().and_then(Value::as_str) != Some(st.client_key.as_str()) {
                        Err(st.refuse("post", event, 401, "invalid client key", now))
                    } else {
                        Ok(event)
                    }
                }
                Ok(other) => Err(st.refuse("post", other, 400, "body must be a JSON object", now)),
                Err(e) => Err(st.refuse("post", Value::Null, 400, &format!("body is not JSON: {e}"), now)),
            }
        }
    };
    match checked {
        Ok(event) => answer_event(&state, "post", event, now).await,
        Err(reply) => reply.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn str_field<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    value.get(field).and_then(Value::as_str)
}

fn nonempty_str<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    str_field(value, field).filter(|s| !s.is_empty())
}

/// Upper-case names such as `WEB`, `MOBILE_APP`, `ORDER_CHECKOUT`, `FOOTWEAR`.
fn is_upper_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Exactly `len` upper-case ASCII letters (ISO 639-1 `EN`, ISO 4217 `EUR`).
fn is_upper_code(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_uppercase())
}

fn is_flat_value(v: &Value) -> bool {
    v.is_string() || v.is_boolean() || v.is_number()
}

fn cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn cart_lines(cart: &BTreeMap<String, CartLine>) -> Vec<OrderLine> {
    cart.iter()
        .map(|(id, l)| OrderLine {
            item_id: id.clone(),
            quantity: l.quantity,
            price: l.price,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Self-tests of the fake (part of the `it` binary)
// ---------------------------------------------------------------------------------------------

const CK: &str = "fake-client-key";
const POS: &str = "fake-pos";

/// A minimal client for the self-tests: mints browsers and sends events with the base fields.
struct Probe {
    http: reqwest::Client,
    base: String,
}

impl Probe {
    fn new(fake: &CdpFake) -> Probe {
        Probe {
            http: reqwest::Client::new(),
            base: fake.base_url(),
        }
    }

    async fn browser(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/v1.2/browser/create.json", self.base))
            .query(&[("client_key", CK), ("message", "{}")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let body: Value = resp.json().await.unwrap();
        body["ref"].as_str().unwrap().to_string()
    }

    /// The base fields of §7.1 plus `extra`.
    fn event(browser_id: &str, event_type: &str, extra: Value) -> Value {
        let mut event = json!({"channel":"WEB","type":event_type,"language":"EN","currency":"EUR",
            "page":"checkout","pos":POS,"browser_id":browser_id});
        for (k, v) in extra.as_object().unwrap() {
            event[k] = v.clone();
        }
        event
    }

    async fn post(&self, event: &Value) -> u16 {
        let mut body = event.clone();
        body["client_key"] = json!(CK);
        let resp = self
            .http
            .post(format!("{}/v1.2/events", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        resp.status().as_u16()
    }

    async fn get(&self, event: &Value) -> u16 {
        let resp = self
            .http
            .get(format!("{}/v1.2/event/create.json", self.base))
            .query(&[("client_key", CK), ("message", &event.to_string())])
            .send()
            .await
            .unwrap();
        resp.status().as_u16()
    }

    async fn send(&self, browser_id: &str, event_type: &str, extra: Value) -> u16 {
        self.post(&Probe::event(browser_id, event_type, extra)).await
    }
}

fn add(item_id: &str, quantity: i64, price: f64) -> Value {
    json!({"product":{"type":"SHOES","item_id":item_id,"name":"Shoe","orderedAt":"2026-11-22T10:15:30.000Z",
        "quantity":quantity,"price":price,"productId":"P-1","currency":"EUR","referenceId":"L-1"}})
}

fn identity(id: &str) -> Value {
    json!({"identifiers":[{"provider":"ordercloud","id":id}]})
}

#[tokio::test]
async fn cdp_fake_browser_create_and_client_key() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let wrong = probe
        .http
        .get(format!(
            "{}/v1.2/browser/create.json?client_key=nope&message=%7B%7D",
            fake.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.json::<Value>().await.unwrap()["error_msg"], "invalid client key");
    let bid = probe.browser().await;
    assert_eq!(fake.browsers_created(), 1);

    // Wrong client key on an event → 401, recorded.
    let mut body = Probe::event(&bid, "VIEW", json!({}));
    body["client_key"] = json!("nope");
    let resp = probe
        .http
        .post(format!("{}/v1.2/events", fake.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Missing type → 400; good event → 201 with the documented body start.
    assert_eq!(probe.post(&json!({"browser_id": bid, "channel": "WEB"})).await, 400);
    assert_eq!(probe.send(&bid, "VIEW", json!({})).await, 201);
    let answered: Vec<u16> = fake.requests().iter().map(|r| r.answered).collect();
    assert_eq!(answered, vec![401, 400, 201]);
    assert!(
        fake.requests()[2].event.get("client_key").is_none(),
        "client_key is not part of the event"
    );
}

#[tokio::test]
async fn cdp_fake_unknown_or_forgotten_browser_is_404() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    assert_eq!(probe.send("not-minted", "VIEW", json!({})).await, 404);
    let bid = probe.browser().await;
    assert_eq!(probe.send(&bid, "VIEW", json!({})).await, 201);
    fake.forget_browser(&bid);
    assert_eq!(probe.send(&bid, "VIEW", json!({})).await, 404);
}

#[tokio::test]
async fn cdp_fake_add_upsert_keeps_latest_quantity_and_checkout_builds_order() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    assert_eq!(probe.send(&bid, "IDENTITY", identity("buyer1-user1")).await, 201);
    assert_eq!(probe.send(&bid, "ADD", add("L1", 1, 10.0)).await, 201);
    assert_eq!(probe.send(&bid, "ADD", add("L1", 3, 9.99)).await, 201);
    assert_eq!(probe.send(&bid, "ADD", add("L0", 2, 0.5)).await, 201);
    let confirm = json!({"product":[{"item_id":"L1"},{"item_id":"L0"}]});
    assert_eq!(probe.send(&bid, "CONFIRM", confirm).await, 201);
    let checkout = json!({"reference_id":"ORDER-1","status":"PURCHASED"});
    assert_eq!(probe.send(&bid, "CHECKOUT", checkout).await, 201);

    assert!(fake.failed_events().is_empty(), "{:?}", fake.failed_events());
    let orders = fake.orders();
    assert_eq!(orders.len(), 1);
    let order = &orders[0];
    assert_eq!(order.via, "checkout");
    assert_eq!(order.shopper.as_deref(), Some("buyer1-user1"));
    assert_eq!(
        order.lines,
        vec![
            OrderLine {
                item_id: "L0".into(),
                quantity: 2.0,
                price: 0.5
            },
            OrderLine {
                item_id: "L1".into(),
                quantity: 3.0,
                price: 9.99
            },
        ]
    );
    assert_eq!(order.revenue, 30.97);
    assert!(fake.finish().is_empty(), "a converted session is not abandoned");
}

#[tokio::test]
async fn cdp_fake_confirm_without_add_gives_no_order() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    // 201 both times (§5: not proof of effect), but both FAILED and no order.
    assert_eq!(
        probe.send(&bid, "CONFIRM", json!({"product":[{"item_id":"L1"}]})).await,
        201
    );
    assert_eq!(
        probe
            .send(&bid, "CHECKOUT", json!({"reference_id":"O1","status":"PURCHASED"}))
            .await,
        201
    );
    assert!(fake.orders().is_empty());
    let failed: Vec<String> = fake.failed_events().iter().map(|r| r.event_type.clone()).collect();
    assert_eq!(failed, vec!["CONFIRM", "CHECKOUT"]);
}

#[tokio::test]
async fn cdp_fake_add_on_other_channel_is_another_session() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    assert_eq!(probe.send(&bid, "ADD", add("L1", 1, 10.0)).await, 201);
    let mut confirm = Probe::event(&bid, "CONFIRM", json!({"product":[{"item_id":"L1"}]}));
    confirm["channel"] = json!("MOBILE_APP");
    assert_eq!(probe.post(&confirm).await, 201);
    assert_eq!(
        fake.failed_events().len(),
        1,
        "§9: CONFIRM must be in the ADD's session"
    );
}

#[tokio::test]
async fn cdp_fake_confirm_object_form_is_accepted_but_checkout_fails() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    assert_eq!(probe.send(&bid, "ADD", add("L1", 1, 10.0)).await, 201);
    assert_eq!(
        probe.send(&bid, "CONFIRM", json!({"product":{"item_id":"L1"}})).await,
        201
    );
    assert!(
        fake.failed_events().is_empty(),
        "the object-form CONFIRM itself is accepted"
    );
    assert_eq!(
        probe
            .send(&bid, "CHECKOUT", json!({"reference_id":"O1","status":"PURCHASED"}))
            .await,
        201
    );
    assert!(fake.orders().is_empty());
    assert_eq!(fake.failed_events()[0].event_type, "CHECKOUT");
}

#[tokio::test]
async fn cdp_fake_invalid_fields_fail_and_wrong_pos_is_lost() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    let mut string_price = add("L1", 1, 10.0);
    string_price["product"]["price"] = json!("10.00");
    assert_eq!(probe.send(&bid, "ADD", string_price).await, 201);
    let mut bad_language = Probe::event(&bid, "VIEW", json!({}));
    bad_language["language"] = json!("en-US");
    assert_eq!(probe.post(&bad_language).await, 201);
    assert_eq!(
        probe
            .send(
                &bid,
                "IDENTITY",
                json!({"identifiers":{"provider":"ordercloud","id":"x"}})
            )
            .await,
        201
    );
    assert_eq!(fake.failed_events().len(), 3);

    let mut wrong_pos = Probe::event(&bid, "ADD", add("L2", 1, 10.0));
    wrong_pos["pos"] = json!("typo-pos");
    assert_eq!(probe.post(&wrong_pos).await, 201);
    assert_eq!(fake.lost_events().len(), 1);
    assert!(fake.finish().is_empty(), "nothing was applied");
}

#[tokio::test]
async fn cdp_fake_get_style_is_processed_like_post() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    // The message contains `&`, `=`, spaces and non-ASCII: percent-encoding must round-trip.
    let mut add_event = Probe::event(&bid, "ADD", add("L&1=a b", 2, 5.0));
    add_event["product"]["name"] = json!("Café – Bücher");
    assert_eq!(probe.get(&add_event).await, 201);
    assert_eq!(
        probe
            .get(&Probe::event(
                &bid,
                "CONFIRM",
                json!({"product":[{"item_id":"L&1=a b"}]})
            ))
            .await,
        201
    );
    let checkout = Probe::event(&bid, "CHECKOUT", json!({"reference_id":"O1","status":"PURCHASED"}));
    assert_eq!(probe.get(&checkout).await, 201);
    assert_eq!(fake.orders().len(), 1, "{:?}", fake.failed_events());
    assert_eq!(fake.orders()[0].revenue, 10.0);
    assert!(fake.requests().iter().all(|r| r.via == "get"));
    assert_eq!(fake.requests()[0].event["product"]["name"], "Café – Bücher");
}

#[tokio::test]
async fn cdp_fake_session_timeout_reports_abandoned_cart_and_opens_new_session() {
    let fake = CdpFake::start(CK, POS, Duration::from_millis(150)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    assert_eq!(probe.send(&bid, "IDENTITY", identity("anon-O1")).await, 201);
    assert_eq!(probe.send(&bid, "ADD", add("L1", 2, 10.0)).await, 201);
    assert_eq!(probe.send(&bid, "ADD", add("L1", 3, 10.0)).await, 201);
    assert!(fake.abandoned_carts().is_empty(), "still open");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let carts = fake.abandoned_carts();
    assert_eq!(carts.len(), 1);
    assert_eq!(carts[0].shopper.as_deref(), Some("anon-O1"));
    assert_eq!(
        carts[0].lines,
        vec![OrderLine {
            item_id: "L1".into(),
            quantity: 3.0,
            price: 10.0
        }]
    );
    assert_eq!(carts[0].revenue, 30.0);

    // A CONFIRM after the timeout lands in a new, empty session: FAILED (§9).
    assert_eq!(
        probe.send(&bid, "CONFIRM", json!({"product":[{"item_id":"L1"}]})).await,
        201
    );
    assert_eq!(fake.failed_events().len(), 1);
    assert_eq!(fake.finish().len(), 1, "the new session has no lines");
}

#[tokio::test]
async fn cdp_fake_clear_cart_before_close_is_not_abandoned() {
    let fake = CdpFake::start(CK, POS, Duration::from_millis(150)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    assert_eq!(probe.send(&bid, "ADD", add("L1", 1, 10.0)).await, 201);
    assert_eq!(probe.send(&bid, "CLEAR_CART", json!({})).await, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake.abandoned_carts().is_empty());

    // Without CLEAR_CART, finish() closes the open session as abandoned.
    assert_eq!(probe.send(&bid, "ADD", add("L2", 1, 4.0)).await, 201);
    let carts = fake.finish();
    assert_eq!(carts.len(), 1);
    assert_eq!(carts[0].lines[0].item_id, "L2");
    assert!(fake.abandoned_carts().is_empty(), "closed by finish, not by timeout");
}

#[tokio::test]
async fn cdp_fake_order_checkout_needs_identity() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    let order = json!({"order":{"referenceId":"O1","orderedAt":"2026-11-22T10:15:30Z","status":"PURCHASED",
        "currencyCode":"EUR","price":25.0,"paymentType":"Card","cardType":"Visa",
        "orderItems":[{"referenceId":"L1","productId":"P1","price":20.0,"quantity":2},
                      {"referenceId":"L2","price":5.0,"quantity":1}]}});
    assert_eq!(probe.send(&bid, "ORDER_CHECKOUT", order.clone()).await, 201);
    assert!(fake.orders().is_empty(), "no IDENTITY yet");
    let mut card_without_type = order.clone();
    card_without_type["order"].as_object_mut().unwrap().remove("cardType");
    assert_eq!(probe.send(&bid, "IDENTITY", identity("buyer1-user1")).await, 201);
    assert_eq!(probe.send(&bid, "ORDER_CHECKOUT", card_without_type).await, 201);
    assert!(fake.orders().is_empty(), "cardType is required for Card");
    assert_eq!(probe.send(&bid, "ORDER_CHECKOUT", order).await, 201);
    let orders = fake.orders();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].via, "order_checkout");
    assert_eq!(orders[0].revenue, 25.0);
    assert_eq!(
        orders[0].lines,
        vec![
            OrderLine {
                item_id: "L2".into(),
                quantity: 1.0,
                price: 5.0
            },
            OrderLine {
                item_id: "P1".into(),
                quantity: 2.0,
                price: 10.0
            },
        ]
    );
    assert_eq!(fake.failed_events().len(), 2);
}

#[tokio::test]
async fn cdp_fake_scripts_answer_before_processing() {
    let fake = CdpFake::start(CK, POS, Duration::from_secs(60)).await;
    let probe = Probe::new(&fake);
    let bid = probe.browser().await;
    fake.script_all(vec![Answer::retry_after(503, "2")]);
    fake.script("buyer1-user1", vec![Answer::status(500), Answer::status(200)]);

    let resp = probe
        .http
        .post(format!("{}/v1.2/events", fake.base_url()))
        .json(&{
            let mut e = Probe::event(&bid, "IDENTITY", identity("buyer1-user1"));
            e["client_key"] = json!(CK);
            e
        })
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "2");
    // The per-identity script applies to the IDENTITY itself (identifiers[0].id) …
    assert_eq!(probe.send(&bid, "IDENTITY", identity("buyer1-user1")).await, 500);
    assert_eq!(
        probe.send(&bid, "ADD", add("L1", 1, 1.0)).await,
        201,
        "not identified yet: no script"
    );
    assert_eq!(probe.send(&bid, "IDENTITY", identity("buyer1-user1")).await, 200);
    // … and, once identified, to the browser's later events; the list is exhausted now.
    assert_eq!(probe.send(&bid, "ADD", add("L1", 2, 1.0)).await, 201);
    let answered: Vec<(u16, Option<String>)> = fake
        .requests()
        .iter()
        .map(|r| (r.answered, r.shopper.clone()))
        .collect();
    let who = Some("buyer1-user1".to_string());
    assert_eq!(
        answered,
        vec![
            (503, who.clone()),
            (500, who.clone()),
            (201, None),
            (200, who.clone()),
            (201, who.clone())
        ]
    );
    assert_eq!(
        fake.finish()[0].lines[0].quantity,
        2.0,
        "scripted 2xx and normal events were applied"
    );
}

/// `GET /v2.1/orders?referenceId=…` (§15): HTTP Basic `client_key:api_token`, else 401; a collection
/// `{href, offset, limit, items: [{ref, referenceId, status}]}`, `items` empty when CDP holds none.
async fn rest_orders(
    State(state): State<Arc<Mutex<CdpState>>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let mut st = lock(&state);
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
    st.rest_calls.push(format!("GET {target}"));
    if st.rest_not_found_page {
        return (
            axum::http::StatusCode::NOT_FOUND,
            [(axum::http::header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>404 Not Found</h1></body></html>",
        )
            .into_response();
    }
    if st.rest_down {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": 503, "code": 503, "message": "Service Unavailable"})),
        )
            .into_response();
    }
    let expected = st.api_token.as_ref().map(|token| {
        use base64::Engine as _;
        let pair = format!("{}:{token}", st.client_key);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
    });
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if expected.is_none() || given != expected.as_deref() {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({"status": 401, "code": 401, "message": "Unauthorized"})),
        )
            .into_response();
    }
    let reference = url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "referenceId")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let items: Vec<Value> = st
        .orders
        .iter()
        .filter(|o| o.reference_id == reference)
        .enumerate()
        .map(|(i, o)| json!({"ref": format!("order-ref-{i}"), "referenceId": o.reference_id, "status": o.status}))
        .collect();
    axum::Json(json!({"href": target, "offset": 0, "limit": 10, "items": items})).into_response()
}
