//! The forwarder's outbound HTTP clients (CDP's Stream and REST APIs, OrderCloud for shoppers and
//! for the order ledger) start from one builder: a request timeout, a connect timeout within it,
//! no redirect followed (a redirect would carry an event, a client key, a token or a secret to
//! wherever it points), and the forwarder's user agent.

use std::time::Duration;

pub fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("ordercloud-cdp-forwarder/", env!("CARGO_PKG_VERSION")))
}
