//! A test world: the real service between a fake OrderCloud and a fake CDP, and shoppers who act
//! on OrderCloud (the fake's state) and send the webhooks OrderCloud would send.

use std::time::Duration;

use ordercloud_cdp_forwarder::config::{ClientChannel, Secret, Settings};
use serde_json::{json, Value};

use crate::fakes::cdp::{CdpFake, Order};
use crate::fakes::ordercloud::OrderCloudFake;
use crate::helpers::*;

pub const CLIENT_KEY: &str = "test-client-key";
pub const POS: &str = "test-shop";
pub const WEB_CLIENT: &str = "web-client";
pub const APP_CLIENT: &str = "app-client";

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
}

impl Shopper<'_> {
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
        json!({"ID": self.order_id, "FromCompanyID": company,
               "FromUser": {"ID": user, "Username": "u", "Email": null, "FirstName": null, "LastName": null},
               "Status": "Unsubmitted", "Currency": "USD", "Subtotal": total, "Total": (total * 100.0).round() / 100.0,
               "LineItemCount": self.lines.len(), "xp": {}})
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
        let line = line_item(line_id, product, quantity, unit_price);
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

    /// `POST v1/orders/Outgoing/{orderID}/submit`; returns the order's expected revenue.
    pub async fn submit(&mut self) -> f64 {
        let order = self.order_json();
        self.world.oc.submit(&self.order_id);
        let w = self.classic(
            "POST",
            "v1/orders/{direction}/{orderID}/submit",
            None,
            Value::Null,
            order.clone(),
        );
        self.world.app.deliver(&w).await;
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
