//! A test world: the real service between a fake OrderCloud and a fake CDP, and shoppers who act
//! on OrderCloud (the fake's state) and send the webhooks OrderCloud would send.

use std::time::Duration;

use ordercloud_cdp_forwarder::config::{ClientChannel, Secret, Settings};
use serde_json::{json, Value};

use ordercloud_cdp_forwarder::store;

use crate::fakes::cdp::{CdpFake, Order};
use crate::fakes::faulty_store::FaultyStore;
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;

pub const CLIENT_KEY: &str = "test-client-key";
pub const POS: &str = "test-shop";
pub const WEB_CLIENT: &str = "web-client";
pub const APP_CLIENT: &str = "app-client";

/// `FromUser.Username` of anonymous shoppers' orders: the API client's default context user.
pub const ANON_TEMPLATE_USERNAME: &str = "anon-template";

pub struct World {
    pub oc: OrderCloudFake,
    pub cdp: CdpFake,
    pub app: TestApp,
}

/// Fast retries and polling, the fakes as peers, the app client on MOBILE_APP.
pub fn world_settings(s: &mut Settings, oc: &OrderCloudFake, cdp: &CdpFake) {
    s.cdp.dry_run = false;
    s.cdp.base_url = Some(cdp.base_url());
    s.cdp.client_key = Secret::new(CLIENT_KEY);
    s.cdp.pos = POS.into();
    s.cdp.clients = vec![ClientChannel {
        client_id: APP_CLIENT.into(),
        channel: "MOBILE_APP".into(),
        pos: POS.into(),
    }];
    s.ordercloud.api_urls = vec![oc.base_url()];
    s.ordercloud.request_timeout_ms = 2_000;
    s.delivery.initial_backoff_ms = 20;
    s.delivery.max_backoff_ms = 200;
    s.delivery.poll_interval_ms = 20;
    s.delivery.request_timeout_ms = 2_000;
    s.delivery.lease_secs = 5;
    // As deployed: /metrics, /admin and readiness's reasons on the operations listener.
    s.server.admin_listen = Some("127.0.0.1:0".into());
}

impl World {
    pub async fn start() -> World {
        World::start_with(Duration::from_secs(1200), |_| {}).await
    }

    /// `session_timeout` is the point of sale's, used by both the fake CDP and the service.
    pub async fn start_with(session_timeout: Duration, configure: impl FnOnce(&mut Settings)) -> World {
        let oc = OrderCloudFake::start().await;
        let cdp = CdpFake::start(CLIENT_KEY, POS, session_timeout).await;
        let app = spawn_app_with(|s| {
            world_settings(s, &oc, &cdp);
            s.cdp.session_timeout_secs = session_timeout.as_secs().max(2);
            s.cdp.session_safety_margin_secs = (s.cdp.session_timeout_secs / 10).clamp(1, 120);
            configure(s);
        })
        .await;
        World { oc, cdp, app }
    }

    /// As [`World::start_with`], with the service's store wrapped in a [`FaultyStore`].
    pub async fn start_faulty(
        session_timeout: Duration,
        configure: impl FnOnce(&mut Settings),
    ) -> (World, std::sync::Arc<FaultyStore>) {
        let oc = OrderCloudFake::start().await;
        let cdp = CdpFake::start(CLIENT_KEY, POS, session_timeout).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = test_settings(dir.path());
        world_settings(&mut s, &oc, &cdp);
        s.cdp.session_timeout_secs = session_timeout.as_secs().max(2);
        s.cdp.session_safety_margin_secs = (s.cdp.session_timeout_secs / 10).clamp(1, 120);
        configure(&mut s);
        let role = store::Role::Service {
            takeover: s.delivery.takeover(),
        };
        let faulty = FaultyStore::wrap(store::open(&s.store, role).await.expect("store opens"));
        let app = spawn_app_on(dir, s, faulty.clone()).await;
        (World { oc, cdp, app }, faulty)
    }

    /// An anonymous shopper whose token carries `orderid = order_id`; their cart is that order.
    pub fn anonymous(&self, order_id: &str, client: &str) -> Shopper<'_> {
        let token = anon_token(order_id, client, &self.oc.base_url());
        self.oc.register_anon_token(&token, order_id);
        Shopper {
            world: self,
            token,
            order_id: order_id.into(),
            lines: Vec::new(),
            user: None,
            storefront_browser: None,
        }
    }

    /// A registered shopper `<buyer>-<user>` with a fresh token from `client`.
    pub fn registered(&self, buyer: &str, user: &str, client: &str) -> Shopper<'_> {
        let username = format!("{user}-login");
        self.oc
            .add_user(buyer, user, &username, &format!("{user}@Example.com"), "Fname", "Lname");
        self.login(buyer, user, client)
    }

    /// Another token for an existing user (a second device).
    pub fn login(&self, buyer: &str, user: &str, client: &str) -> Shopper<'_> {
        let username = format!("{user}-login");
        let token = user_token(&username, client, &self.oc.base_url());
        self.oc.register_token(&token, &username);
        Shopper {
            world: self,
            token,
            order_id: String::new(),
            lines: Vec::new(),
            user: Some((buyer.into(), user.into())),
            storefront_browser: None,
        }
    }

    /// Waits until CDP holds an order with this reference.
    pub async fn order(&self, reference: &str) -> Order {
        eventually(&format!("CDP order {reference}"), Duration::from_secs(20), || async {
            self.cdp.orders().into_iter().find(|o| o.reference_id == reference)
        })
        .await
    }

    /// Waits until nothing is pending in the service's queue.
    pub async fn drained(&self) {
        eventually("an empty queue", Duration::from_secs(20), || async {
            self.app.store.pending(1).await.unwrap().is_empty().then_some(())
        })
        .await
    }
}

pub struct Shopper<'w> {
    pub world: &'w World,
    pub token: String,
    pub order_id: String,
    /// The cart as OrderCloud holds it.
    pub lines: Vec<Value>,
    pub user: Option<(String, String)>,
    /// A CDP browser id the storefront puts in `xp.cdpBrowserId` of lines and orders.
    pub storefront_browser: Option<String>,
}

impl<'w> Shopper<'w> {
    pub fn identity(&self) -> String {
        match &self.user {
            Some((buyer, user)) => format!("{buyer}-{user}"),
            None => format!("anon-{}", self.order_id),
        }
    }

    fn order_json(&self) -> Value {
        let total: f64 = self.lines.iter().map(|l| l["LineTotal"].as_f64().unwrap()).sum();
        let (company, user) = self
            .user
            .clone()
            .unwrap_or(("anon-buyer".into(), "anon-template-user".into()));
        // OrderCloud's OrderUser: the user's own login, or the anonymous template user's.
        let username = match &self.user {
            Some((_, user)) => format!("{user}-login"),
            None => ANON_TEMPLATE_USERNAME.to_string(),
        };
        let xp = match &self.storefront_browser {
            Some(b) => json!({"cdpBrowserId": b}),
            None => json!({}),
        };
        json!({"ID": self.order_id, "FromCompanyID": company,
               "FromUser": {"ID": user, "Username": username, "Email": null, "FirstName": null, "LastName": null},
               "Status": "Unsubmitted", "Currency": "USD", "Subtotal": total, "Total": (total * 100.0).round() / 100.0,
               "LineItemCount": self.lines.len(), "xp": xp})
    }

    /// Starts a cart (an unsubmitted order) on OrderCloud.
    pub fn open_cart(&mut self, order_id: &str) {
        self.order_id = order_id.into();
        self.lines.clear();
        self.world.oc.set_cart(&self.token, self.order_json(), Vec::new());
    }

    fn sync(&self) {
        self.world.oc.set_lines(&self.order_id, self.lines.clone());
    }

    fn ensure_cart(&mut self) {
        if self.order_id.is_empty() {
            panic!("open_cart first");
        }
        if self.world.oc.lines(&self.order_id).is_empty() && self.lines.is_empty() {
            self.world.oc.set_cart(&self.token, self.order_json(), Vec::new());
        }
    }

    fn classic(&self, verb: &str, route: &str, line_id: Option<&str>, request: Value, response: Value) -> Value {
        let mut params = json!({"direction": "Outgoing", "orderID": self.order_id});
        if let Some(id) = line_id {
            params["lineItemID"] = json!(id);
        }
        envelope(verb, route, params, Some(&self.token), request, response)
    }

    /// `POST v1/orders/Outgoing/{orderID}/lineitems`.
    pub async fn add(&mut self, line_id: &str, product: &str, quantity: i64, unit_price: f64) -> Value {
        self.ensure_cart();
        let mut line = line_item(line_id, product, quantity, unit_price);
        if let Some(b) = &self.storefront_browser {
            line["xp"] = json!({"cdpBrowserId": b});
        }
        self.lines.push(line.clone());
        self.sync();
        let w = self.classic(
            "POST",
            "v1/orders/{direction}/{orderID}/lineitems",
            None,
            json!({"ProductID": product, "Quantity": quantity}),
            line.clone(),
        );
        self.world.app.deliver(&w).await;
        line
    }

    /// `PATCH …/lineitems/{lineItemID}` changing the quantity.
    pub async fn set_quantity(&mut self, line_id: &str, quantity: i64) {
        let line = self.lines.iter_mut().find(|l| l["ID"] == line_id).expect("line exists");
        let unit = line["UnitPrice"].as_f64().unwrap();
        line["Quantity"] = json!(quantity);
        line["LineSubtotal"] = json!(unit * quantity as f64);
        line["LineTotal"] = json!(unit * quantity as f64);
        let line = line.clone();
        self.sync();
        let w = self.classic(
            "PATCH",
            "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}",
            Some(line_id),
            json!({"Quantity": quantity}),
            line,
        );
        self.world.app.deliver(&w).await;
    }

    /// `DELETE …/lineitems/{lineItemID}` (no bodies, as OrderCloud sends it).
    pub async fn delete(&mut self, line_id: &str) {
        self.lines.retain(|l| l["ID"] != line_id);
        self.sync();
        let w = self.classic(
            "DELETE",
            "v1/orders/{direction}/{orderID}/lineitems/{lineItemID}",
            Some(line_id),
            Value::Null,
            Value::Null,
        );
        self.world.app.deliver(&w).await;
    }

    /// `DELETE v1/orders/{direction}/{orderID}`: the whole unsubmitted order (no bodies).
    pub async fn delete_cart(&mut self) {
        self.lines.clear();
        self.sync();
        let w = self.classic(
            "DELETE",
            "v1/orders/{direction}/{orderID}",
            None,
            Value::Null,
            Value::Null,
        );
        self.world.app.deliver(&w).await;
    }

    /// `POST v1/orders/Outgoing/{orderID}/submit`; returns the order's expected revenue.
    pub async fn submit(&mut self) -> f64 {
        let token = self.token.clone();
        self.submit_with_token(Some(&token)).await
    }

    /// `POST v1/orders/Outgoing/{orderID}/submit` whose webhook carries no `UserToken` (OrderCloud
    /// sends none for some callers): the service cannot tell which shopper acted.
    pub async fn submit_without_user_token(&mut self) -> f64 {
        self.submit_with_token(None).await
    }

    /// The order submitted in OrderCloud and its webhook delivered, carrying `token`.
    async fn submit_with_token(&mut self, token: Option<&str>) -> f64 {
        let order = self.order_json();
        self.world.oc.submit(&self.order_id);
        let params = json!({"direction": "Outgoing", "orderID": self.order_id});
        let w = envelope(
            "POST",
            "v1/orders/{direction}/{orderID}/submit",
            params,
            token,
            Value::Null,
            order.clone(),
        );
        self.world.app.deliver(&w).await;
        order["Total"].as_f64().unwrap()
    }

    /// The order is submitted in OrderCloud, and its webhook never arrives (OrderCloud documents no
    /// retry; a portal submit fires none). Returns the order's expected revenue.
    pub fn submit_without_webhook(&mut self) -> f64 {
        let order = self.order_json();
        self.world.oc.submit(&self.order_id);
        order["Total"].as_f64().unwrap()
    }

    /// Cart API: `POST v1/cart/lineitems` (no order ID anywhere in the webhook).
    pub async fn cart_add(&mut self, line_id: &str, product: &str, quantity: i64, unit_price: f64) {
        self.ensure_cart();
        let line = line_item(line_id, product, quantity, unit_price);
        self.lines.push(line.clone());
        self.sync();
        let w = envelope(
            "POST",
            "v1/cart/lineitems",
            json!({}),
            Some(&self.token),
            json!({"ProductID": product, "Quantity": quantity}),
            line,
        );
        self.world.app.deliver(&w).await;
    }

    /// Cart API: `DELETE v1/cart/lineitems/{lineItemID}`.
    pub async fn cart_delete(&mut self, line_id: &str) {
        self.lines.retain(|l| l["ID"] != line_id);
        self.sync();
        let w = envelope(
            "DELETE",
            "v1/cart/lineitems/{lineItemID}",
            json!({"lineItemID": line_id}),
            Some(&self.token),
            Value::Null,
            Value::Null,
        );
        self.world.app.deliver(&w).await;
    }

    /// Cart API: `POST v1/cart/submit`.
    pub async fn cart_submit(&mut self) -> f64 {
        let order = self.order_json();
        self.world.oc.submit(&self.order_id);
        let w = envelope(
            "POST",
            "v1/cart/submit",
            json!({}),
            Some(&self.token),
            Value::Null,
            order.clone(),
        );
        self.world.app.deliver(&w).await;
        order["Total"].as_f64().unwrap()
    }
}

impl<'w> Shopper<'w> {
    /// The same registered user on another device (API client), with the same cart.
    pub fn on_device(&self, client: &str) -> Shopper<'w> {
        let (buyer, user) = self.user.clone().expect("a registered shopper");
        let mut other = self.world.login(&buyer, &user, client);
        other.order_id = self.order_id.clone();
        other.lines = self.lines.clone();
        other
    }

    /// The anonymous shopper registers (`PUT v1/me/register?anonUserToken=…`): the webhook's token
    /// is the anonymous one and the answer carries the new user's access_token. OrderCloud moves
    /// the anonymous order to the new user.
    pub async fn register(&self, buyer: &str, user: &str, with_anon_token_in_query: bool) -> Shopper<'w> {
        let mut registered = self.world.registered(buyer, user, WEB_CLIENT);
        self.world.oc.transfer_order(&self.order_id, &registered.token);
        let mut w = envelope(
            "PUT",
            "v1/me/register",
            json!({}),
            Some(&self.token),
            json!({"Username": format!("{user}-login"), "FirstName": "Reg", "LastName": "Istered",
                   "Email": format!("{user}@Example.com"), "Active": true, "Password": "hunter2"}),
            json!({"access_token": registered.token}),
        );
        if with_anon_token_in_query {
            w["QueryParams"] = json!({"anonUserToken": self.token});
        }
        self.world.app.deliver(&w).await;
        registered.order_id = self.order_id.clone();
        registered.lines = self.lines.clone();
        registered
    }

    /// A logged-in shopper takes over the anonymous order (`PUT v1/me/orders?anonUserToken=…`).
    pub async fn transfer_from(&mut self, anonymous: &Shopper<'_>, with_anon_token_in_query: bool) {
        self.world.oc.transfer_order(&anonymous.order_id, &self.token);
        let mut w = envelope(
            "PUT",
            "v1/me/orders",
            json!({}),
            Some(&self.token),
            Value::Null,
            Value::Null,
        );
        if with_anon_token_in_query {
            w["QueryParams"] = json!({"anonUserToken": anonymous.token});
        }
        self.world.app.deliver(&w).await;
        self.order_id = anonymous.order_id.clone();
        self.lines = anonymous.lines.clone();
    }

    /// Guest details at checkout: `PATCH v1/orders/Outgoing/{orderID}/fromuser`.
    pub async fn guest_details(&self, email: &str, first: &str, last: &str) {
        let w = self.classic(
            "PATCH",
            "v1/orders/{direction}/{orderID}/fromuser",
            None,
            json!({"Email": email, "FirstName": first, "LastName": last}),
            self.order_json(),
        );
        self.world.app.deliver(&w).await;
    }
}

impl World {
    /// Waits until every queued intent is delivered and every CDP session has timed out.
    pub async fn sessions_closed(&self) {
        self.drained().await;
        eventually("CDP sessions to time out", Duration::from_secs(30), || async {
            (self.cdp.open_sessions() == 0).then_some(())
        })
        .await
    }

    /// A browser id minted by CDP for a storefront (as its JavaScript tag would).
    pub async fn storefront_browser(&self) -> String {
        let url = format!(
            "{}/v1.2/browser/create.json?client_key={CLIENT_KEY}&message=%7B%7D",
            self.cdp.base_url()
        );
        let answer: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        answer["ref"].as_str().unwrap().to_string()
    }
}

/// The environment of a real binary that talks to these fakes, with fast retries.
pub fn binary_env(dir: &std::path::Path, oc: &OrderCloudFake, cdp: &CdpFake) -> Vec<(&'static str, String)> {
    let mut env = store_env(dir);
    env.extend([
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY.to_string()),
        ("FORWARDER__ORDERCLOUD__API_URLS", oc.base_url()),
        ("FORWARDER__CDP__BASE_URL", cdp.base_url()),
        ("FORWARDER__CDP__CLIENT_KEY", CLIENT_KEY.to_string()),
        ("FORWARDER__CDP__POS", POS.to_string()),
        ("FORWARDER__DELIVERY__INITIAL_BACKOFF_MS", "20".to_string()),
        ("FORWARDER__DELIVERY__MAX_BACKOFF_MS", "100".to_string()),
        ("FORWARDER__DELIVERY__POLL_INTERVAL_MS", "20".to_string()),
    ]);
    env
}

/// Anonymous shoppers `<prefix>-0…` each add one line (price 10 + i) and submit, through `binary`.
pub async fn post_orders(binary: &Binary, oc: &OrderCloudFake, prefix: &str, shoppers: usize) {
    for i in 0..shoppers {
        let order = format!("{prefix}-{i}");
        let token = anon_token(&order, WEB_CLIENT, &oc.base_url());
        oc.register_anon_token(&token, &order);
        let line = line_item("L1", &format!("SKU-{i}"), 1, 10.0 + i as f64);
        oc.set_cart(&token, json!({"ID": order, "Currency": "USD"}), vec![line.clone()]);
        assert_eq!(binary.post(&line_created(&order, &token, &line)).await, 200);
        oc.submit(&order);
        let submit = envelope(
            "POST",
            "v1/orders/{direction}/{orderID}/submit",
            json!({"direction": "Outgoing", "orderID": order}),
            Some(&token),
            Value::Null,
            json!({"ID": order, "Currency": "USD", "Total": 10.0 + i as f64}),
        );
        assert_eq!(binary.post(&submit).await, 200);
    }
}

impl World {
    /// Waits for the first dead letters to appear.
    pub async fn dead_letters(&self) -> Vec<ordercloud_cdp_forwarder::store::DeadLetter> {
        self.app.dead_letters().await
    }
}

/// An order's lines as (item_id, quantity, price).
pub fn lines(order: &Order) -> Vec<(String, f64, f64)> {
    order
        .lines
        .iter()
        .map(|l| (l.item_id.clone(), l.quantity, l.price))
        .collect()
}
