//! The benchmarks' workload: realistic OrderCloud webhooks of about 2 KB, unique and signed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};

pub const KEY: &str = "bench-hash-key-0001";
pub const LINES_PER_ORDER: usize = 4;
/// Webhooks per shopper: the line creates, then the submit.
pub const STEPS: usize = LINES_PER_ORDER + 1;

/// Of every 10 shoppers of [`webhook_mixed`], this many are registered (a token naming the user;
/// their identity is read once per shopper from OrderCloud's `GET v1/me`), the rest anonymous.
pub const REGISTERED_PER_10: u64 = 7;
/// The buyer organisation of the registered shoppers.
pub const BUYER: &str = "buyer-1";

pub fn is_registered(shopper: u64) -> bool {
    shopper % 10 < REGISTERED_PER_10
}

/// A registered shopper's user ID, and the username their token carries.
pub fn user_of(shopper: u64) -> (String, String) {
    (format!("user{shopper}"), format!("user{shopper}-login"))
}

fn jwt(claims: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"bench"}"#);
    format!(
        "{header}.{}.YmVuY2gtc2lnbmF0dXJlLW5vdC1jaGVja2Vk",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn anon_token(order_id: &str, aud: &str) -> String {
    jwt(
        json!({"usr":"anon-template","cid":"storefront-web","orderid":order_id,"usrtype":"buyer",
        "role":["Shopper","MeAdmin"],"iss":"https://auth.ordercloud.io","aud":aud,
        "exp": 4_102_444_800u64,"nbf":1_700_000_000u64}),
    )
}

fn user_token(shopper: u64, aud: &str) -> String {
    jwt(
        json!({"usr":user_of(shopper).1,"cid":"storefront-web","usrtype":"buyer","role":"Shopper",
        "iss":"https://auth.ordercloud.io","aud":aud,"exp": 4_102_444_800u64,"nbf":1_700_000_000u64}),
    )
}

/// The user a registered shopper's token names (read by the OrderCloud stand-in from `Authorization`).
pub fn username_in(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims.get("usr")?.as_str().map(str::to_string)
}

/// Order IDs as OrderCloud generates them (random-looking URL-safe characters), derived from the run
/// and the shopper so that a shopper's webhooks agree. Numbered IDs would put concurrent shoppers'
/// queue entries side by side in the store's indexes; OrderCloud's scatter them. The shopper's number
/// follows the random part, so that the OrderCloud stand-in can answer the order's lines.
fn order_id(run: &str, shopper: u64) -> String {
    let mut bytes = Sha256::digest(format!("{run}-{shopper}").as_bytes())[..12].to_vec();
    bytes.extend_from_slice(&shopper.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The shopper whose order this is (see [`order_id`]).
pub fn shopper_of_order(order_id: &str) -> Option<u64> {
    let bytes = URL_SAFE_NO_PAD.decode(order_id).ok()?;
    Some(u64::from_be_bytes(bytes.get(12..20)?.try_into().ok()?))
}

const DATE: &str = "2026-11-22T10:15:30.1234567+00:00";

/// Line `step` of a shopper's cart, as OrderCloud returns a LineItem (~1.5 KB).
pub fn line(shopper: u64, step: usize) -> serde_json::Value {
    let product = format!("SKU-{:05}", (shopper as usize * 7 + step) % 5000);
    json!({
        "ID": format!("L{step}"), "ProductID": product, "Quantity": step + 1, "UnitPrice": 19.99,
        "PromotionDiscount": 0, "LineTotal": 19.99 * (step + 1) as f64, "LineSubtotal": 19.99 * (step + 1) as f64,
        "CostCenter": null, "DateNeeded": null, "ShippingAccount": null, "ShippingAddressID": null,
        "ShipFromAddressID": null, "InventoryRecordID": null, "PriceScheduleID": "default-prices",
        "IsOnSale": false, "PriceOverridden": false, "DateAdded": DATE, "QuantityShipped": 0,
        "Product": {"ID": product, "Name": format!("Trail running shoe {product}"),
            "Description": "Lightweight trail running shoe with a grippy outsole, a breathable mesh upper and a cushioned midsole for long days on rough ground.",
            "Returnable": true, "QuantityMultiplier": 1, "ShipWeight": 0.9, "ShipHeight": 12, "ShipWidth": 20,
            "ShipLength": 32, "DefaultSupplierID": null, "ParentID": null,
            "xp": {"category": "footwear", "brand": "Summit", "color": "blue", "sizeSystem": "EU"}},
        "Variant": null, "ShippingAddress": null, "ShipFromAddress": null, "SupplierID": null,
        "Specs": [{"SpecID": "size", "Name": "Size", "OptionID": "42", "Value": "42", "PriceMarkupType": "NoMarkup", "PriceMarkup": null}],
        "xp": {"giftWrap": false, "note": "bench"}
    })
}

/// Webhook `step` of anonymous shopper `shopper` in run `run` (a line create, or the submit), about
/// 2 KB; its token names an API host the service does not call.
pub fn webhook(run: &str, shopper: u64, step: usize) -> Vec<u8> {
    build(run, shopper, step, false, "http://127.0.0.1:9")
}

/// Like [`webhook`], but [`REGISTERED_PER_10`] shoppers of 10 are registered, and every token names
/// `ordercloud` (the stand-in), which the service reads: `GET v1/me` once per registered shopper,
/// the order's lines at each submit.
pub fn webhook_mixed(run: &str, shopper: u64, step: usize, ordercloud: &str) -> Vec<u8> {
    build(run, shopper, step, is_registered(shopper), ordercloud)
}

fn build(run: &str, shopper: u64, step: usize, registered: bool, aud: &str) -> Vec<u8> {
    let order = order_id(run, shopper);
    let token = if registered {
        user_token(shopper, aud)
    } else {
        anon_token(&order, aud)
    };
    let date = DATE;
    let log_id = uuid::Uuid::new_v4().to_string();
    let (user_id, username) = if registered {
        user_of(shopper)
    } else {
        ("anon".to_string(), "anon-template".to_string())
    };
    let body = if step < LINES_PER_ORDER {
        let line = line(shopper, step);
        json!({"Route": "v1/orders/{direction}/{orderID}/lineitems",
            "RouteParams": {"direction": "Outgoing", "orderID": order}, "QueryParams": {}, "Verb": "POST",
            "Date": date, "LogID": log_id, "UserToken": token,
            "Request": {"Body": {"ProductID": line["ProductID"], "Quantity": line["Quantity"], "Specs": line["Specs"]}, "Headers": null},
            "Response": {"Body": line, "Headers": null}, "ConfigData": {"environment": "bench"}})
    } else {
        let total = (1..=LINES_PER_ORDER).map(|q| 19.99 * q as f64).sum::<f64>();
        json!({"Route": "v1/orders/{direction}/{orderID}/submit",
            "RouteParams": {"direction": "Outgoing", "orderID": order}, "QueryParams": {}, "Verb": "POST",
            "Date": date, "LogID": log_id, "UserToken": token, "Request": {"Body": null, "Headers": null},
            "Response": {"Body": {"ID": order, "FromCompanyID": BUYER, "FromUserID": user_id,
                "FromUser": {"ID": user_id, "Username": username, "FirstName": null, "LastName": null, "Email": null},
                "BillingAddressID": null, "ShippingAddressID": null, "Comments": "", "LineItemCount": LINES_PER_ORDER,
                "Status": "Open", "DateCreated": date, "DateSubmitted": date, "Subtotal": total, "ShippingCost": 0,
                "TaxCost": 0, "Gratuity": 0, "Fees": 0, "PromotionDiscount": 0, "Currency": "USD", "Total": total,
                "IsSubmitted": true, "xp": {"channel": "web"}}, "Headers": null},
            "ConfigData": {"environment": "bench"}})
    };
    serde_json::to_vec(&body).unwrap()
}
