//! The benchmarks' workload: realistic OrderCloud webhooks of about 2 KB, unique and signed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};

pub const KEY: &str = "bench-hash-key-0001";
pub const LINES_PER_ORDER: usize = 4;
/// Webhooks per shopper: the line creates, then the submit.
pub const STEPS: usize = LINES_PER_ORDER + 1;

fn jwt(order_id: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"bench"}"#);
    let claims = json!({"usr":"anon-template","cid":"storefront-web","orderid":order_id,"usrtype":"buyer",
        "role":["Shopper","MeAdmin"],"iss":"https://auth.ordercloud.io","aud":"http://127.0.0.1:9",
        "exp": 4_102_444_800u64,"nbf":1_700_000_000u64});
    format!(
        "{header}.{}.YmVuY2gtc2lnbmF0dXJlLW5vdC1jaGVja2Vk",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Order IDs as OrderCloud generates them (22 URL-safe characters, random-looking), derived from
/// the run and the shopper so that a shopper's webhooks agree. Numbered IDs would put concurrent
/// shoppers' queue entries side by side in the store's indexes; OrderCloud's scatter them.
fn order_id(run: &str, shopper: u64) -> String {
    URL_SAFE_NO_PAD.encode(&Sha256::digest(format!("{run}-{shopper}").as_bytes())[..16])
}

/// Webhook `step` of shopper `shopper` in run `run` (a line create, or the submit), about 2 KB.
pub fn webhook(run: &str, shopper: u64, step: usize) -> Vec<u8> {
    let order = order_id(run, shopper);
    let token = jwt(&order);
    let date = "2026-11-22T10:15:30.1234567+00:00";
    let log_id = uuid::Uuid::new_v4().to_string();
    let body = if step < LINES_PER_ORDER {
        let product = format!("SKU-{:05}", (shopper as usize * 7 + step) % 5000);
        let line = json!({
            "ID": format!("L{step}"), "ProductID": product, "Quantity": step + 1, "UnitPrice": 19.99,
            "PromotionDiscount": 0, "LineTotal": 19.99 * (step + 1) as f64, "LineSubtotal": 19.99 * (step + 1) as f64,
            "CostCenter": null, "DateNeeded": null, "ShippingAccount": null, "ShippingAddressID": null,
            "ShipFromAddressID": null, "InventoryRecordID": null, "PriceScheduleID": "default-prices",
            "IsOnSale": false, "PriceOverridden": false, "DateAdded": date, "QuantityShipped": 0,
            "Product": {"ID": product, "Name": format!("Trail running shoe {product}"),
                "Description": "Lightweight trail running shoe with a grippy outsole, a breathable mesh upper and a cushioned midsole for long days on rough ground.",
                "Returnable": true, "QuantityMultiplier": 1, "ShipWeight": 0.9, "ShipHeight": 12, "ShipWidth": 20,
                "ShipLength": 32, "DefaultSupplierID": null, "ParentID": null,
                "xp": {"category": "footwear", "brand": "Summit", "color": "blue", "sizeSystem": "EU"}},
            "Variant": null, "ShippingAddress": null, "ShipFromAddress": null, "SupplierID": null,
            "Specs": [{"SpecID": "size", "Name": "Size", "OptionID": "42", "Value": "42", "PriceMarkupType": "NoMarkup", "PriceMarkup": null}],
            "xp": {"giftWrap": false, "note": "bench"}
        });
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
            "Response": {"Body": {"ID": order, "FromCompanyID": "buyer-1", "FromUserID": "anon",
                "FromUser": {"ID": "anon", "Username": "anon-template", "FirstName": null, "LastName": null, "Email": null},
                "BillingAddressID": null, "ShippingAddressID": null, "Comments": "", "LineItemCount": LINES_PER_ORDER,
                "Status": "Open", "DateCreated": date, "DateSubmitted": date, "Subtotal": total, "ShippingCost": 0,
                "TaxCost": 0, "Gratuity": 0, "Fees": 0, "PromotionDiscount": 0, "Currency": "USD", "Total": total,
                "IsSubmitted": true, "xp": {"channel": "web"}}, "Headers": null},
            "ConfigData": {"environment": "bench"}})
    };
    serde_json::to_vec(&body).unwrap()
}
