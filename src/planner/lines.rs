//! OrderCloud line items → CDP products. Lines that share an item_id become one ADD whose quantity
//! is their sum and whose price keeps their total, because CDP keeps only the latest ADD per item_id.

use serde_json::Value;

use crate::cdp::{OrderItem, Product};
use crate::config::{CdpSettings, ItemIdSource};

/// The parts of an OrderCloud LineItem the events need.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub id: String,
    pub product_id: String,
    pub variant_id: Option<String>,
    pub name: String,
    pub quantity: i64,
    /// What the shopper pays for the line: LineTotal, else UnitPrice × Quantity.
    pub total: f64,
    pub product_type: Option<String>,
}

impl Line {
    /// Reads a LineItem; `None` when it lacks an ID or a ProductID.
    pub fn from_json(value: &Value, cdp: &CdpSettings) -> Option<Line> {
        let text = |pointer: &str| value.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty());
        let number = |pointer: &str| value.pointer(pointer).and_then(Value::as_f64);
        let id = text("/ID")?.to_string();
        let product_id = text("/ProductID").or_else(|| text("/Product/ID"))?.to_string();
        let quantity = value.pointer("/Quantity").and_then(Value::as_i64).unwrap_or(1).max(0);
        let total = number("/LineTotal")
            .or_else(|| number("/LineSubtotal"))
            .or_else(|| number("/UnitPrice").map(|p| p * quantity as f64))
            .unwrap_or(0.0);
        let product_type = cdp
            .product_type_field
            .as_deref()
            .and_then(|field| value.pointer("/Product/xp").and_then(|xp| xp.get(field)))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_ascii_uppercase);
        Some(Line {
            name: text("/Product/Name").unwrap_or(&product_id).to_string(),
            variant_id: text("/Variant/ID").map(str::to_string),
            id,
            product_id,
            quantity,
            total,
            product_type,
        })
    }

    /// What of a LineItem the forwarder keeps in its record of a cart: the fields [`Line::from_json`]
    /// reads, with the whole of `Product.xp` (the field `cdp.product_type_field` names may change
    /// between recording and planning). `from_json` reads the same line from it; the rest of the
    /// LineItem (descriptions, specs, addresses, ~1.5 KB) would only be stored, read back and parsed
    /// again for every later event of the cart.
    pub fn kept(value: &Value) -> Value {
        let Value::Object(line) = value else {
            return value.clone();
        };
        let pick = |from: &serde_json::Map<String, Value>, keys: &[&str]| -> serde_json::Map<String, Value> {
            keys.iter()
                .filter_map(|k| from.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect()
        };
        let mut kept = pick(
            line,
            &["ID", "ProductID", "Quantity", "LineTotal", "LineSubtotal", "UnitPrice"],
        );
        for (key, fields) in [("Product", &["ID", "Name", "xp"][..]), ("Variant", &["ID"][..])] {
            match line.get(key) {
                Some(Value::Object(part)) => {
                    kept.insert(key.to_string(), Value::Object(pick(part, fields)));
                }
                Some(other) => {
                    kept.insert(key.to_string(), other.clone());
                }
                None => {}
            }
        }
        Value::Object(kept)
    }

    pub fn item_id(&self, source: ItemIdSource) -> &str {
        match source {
            ItemIdSource::VariantOrProduct => self.variant_id.as_deref().unwrap_or(&self.product_id),
            ItemIdSource::Product => &self.product_id,
            ItemIdSource::LineItem => &self.id,
        }
    }
}

/// Reads every usable line.
pub fn parse_lines<'a>(values: impl IntoIterator<Item = &'a Value>, cdp: &CdpSettings) -> Vec<Line> {
    values.into_iter().filter_map(|v| Line::from_json(v, cdp)).collect()
}

/// Lines grouped by item_id, in order of first appearance.
pub fn products(lines: &[Line], cdp: &CdpSettings, currency: &str, ordered_at: &str) -> Vec<Product> {
    let mut products: Vec<Product> = Vec::new();
    let mut totals: Vec<f64> = Vec::new();
    for line in lines.iter().filter(|l| l.quantity > 0) {
        let item_id = line.item_id(cdp.item_id);
        match products.iter().position(|p| p.item_id == item_id) {
            Some(i) => {
                products[i].quantity += line.quantity;
                totals[i] += line.total;
            }
            None => {
                products.push(Product {
                    product_type: line
                        .product_type
                        .clone()
                        .unwrap_or_else(|| cdp.product_type.to_ascii_uppercase()),
                    item_id: item_id.to_string(),
                    name: line.name.clone(),
                    ordered_at: ordered_at.to_string(),
                    quantity: line.quantity,
                    price: 0.0,
                    product_id: line.product_id.clone(),
                    currency: currency.to_string(),
                    reference_id: line.id.clone(),
                });
                totals.push(line.total);
            }
        }
    }
    for (product, total) in products.iter_mut().zip(totals) {
        product.price = total / product.quantity as f64;
    }
    products
}

/// ORDER_CHECKOUT's orderItems: one per product, price = the product's line total.
pub fn order_items(products: &[Product]) -> Vec<OrderItem> {
    products
        .iter()
        .map(|p| OrderItem {
            item_type: p.product_type.clone(),
            reference_id: p.reference_id.clone(),
            ordered_at: p.ordered_at.clone(),
            status: "PURCHASED".into(),
            currency_code: p.currency.clone(),
            price: round_cents(p.price * p.quantity as f64),
            name: p.name.clone(),
            product_id: p.item_id.clone(),
            quantity: p.quantity,
        })
        .collect()
}

pub fn round_cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn line(id: &str, product: &str, variant: Option<&str>, qty: i64, total: f64) -> Value {
        json!({"ID": id, "ProductID": product, "Quantity": qty, "LineTotal": total,
               "Product": {"ID": product, "Name": format!("N-{product}"), "xp": {"category": "shoes"}},
               "Variant": variant.map(|v| json!({"ID": v}))})
    }

    #[test]
    fn item_id_sources() {
        let cdp = CdpSettings::default();
        let l = Line::from_json(&line("L1", "P1", Some("V1"), 1, 5.0), &cdp).unwrap();
        assert_eq!(l.item_id(ItemIdSource::VariantOrProduct), "V1");
        assert_eq!(l.item_id(ItemIdSource::Product), "P1");
        assert_eq!(l.item_id(ItemIdSource::LineItem), "L1");
        let no_variant = Line::from_json(&line("L2", "P2", None, 1, 5.0), &cdp).unwrap();
        assert_eq!(no_variant.item_id(ItemIdSource::VariantOrProduct), "P2");
    }

    #[test]
    fn lines_sharing_an_item_id_become_one_product_with_exact_total() {
        let cdp = CdpSettings {
            item_id: ItemIdSource::Product,
            ..CdpSettings::default()
        };
        let lines = parse_lines(
            &[line("L1", "P1", None, 1, 10.00), line("L2", "P1", None, 2, 10.01)],
            &cdp,
        );
        let products = products(&lines, &cdp, "EUR", "2026-01-01T00:00:00.000Z");
        assert_eq!(products.len(), 1);
        assert_eq!(products[0].quantity, 3);
        assert_eq!(round_cents(products[0].price * 3.0), 20.01);
        assert_eq!(products[0].reference_id, "L1");
        assert_eq!(products[0].product_type, "PRODUCT");
    }

    #[test]
    fn product_type_from_a_configured_xp_field() {
        let cdp = CdpSettings {
            product_type_field: Some("category".into()),
            ..CdpSettings::default()
        };
        let lines = parse_lines(&[line("L1", "P1", None, 1, 1.0)], &cdp);
        assert_eq!(products(&lines, &cdp, "EUR", "t")[0].product_type, "SHOES");
    }

    /// A LineItem as OrderCloud returns it (the shape of the benchmarks' lines, ~1.5 KB).
    fn full_line() -> Value {
        json!({"ID": "L1", "ProductID": "SKU-1", "Quantity": 2, "UnitPrice": 19.99, "PromotionDiscount": 0,
            "LineTotal": 39.98, "LineSubtotal": 39.98, "CostCenter": null, "DateNeeded": null,
            "ShippingAccount": null, "ShippingAddressID": null, "PriceScheduleID": "default-prices",
            "DateAdded": "2026-11-22T10:15:30.1234567+00:00", "QuantityShipped": 0,
            "Product": {"ID": "SKU-1", "Name": "Trail running shoe", "Description": "Lightweight trail running shoe with a grippy outsole, a breathable mesh upper and a cushioned midsole for long days on rough ground.",
                "Returnable": true, "QuantityMultiplier": 1, "ShipWeight": 0.9, "DefaultSupplierID": null,
                "xp": {"category": "footwear", "brand": "Summit"}},
            "Variant": {"ID": "SKU-1-42", "Name": "42", "Description": "EU 42", "xp": {}},
            "ShippingAddress": null, "ShipFromAddress": null, "SupplierID": null,
            "Specs": [{"SpecID": "size", "Name": "Size", "OptionID": "42", "Value": "42", "PriceMarkupType": "NoMarkup", "PriceMarkup": null}],
            "xp": {"giftWrap": false, "note": "bench"}})
    }

    #[test]
    fn the_kept_part_of_a_line_reads_as_the_whole_line_and_is_a_fraction_of_it() {
        for field in [None, Some("category"), Some("brand"), Some("missing")] {
            let cdp = CdpSettings {
                product_type_field: field.map(str::to_string),
                ..CdpSettings::default()
            };
            let full = full_line();
            let kept = Line::kept(&full);
            assert_eq!(Line::from_json(&kept, &cdp), Line::from_json(&full, &cdp), "{field:?}");
            assert!(Line::from_json(&kept, &cdp).is_some());
        }
        let (full, kept) = (
            full_line().to_string().len(),
            Line::kept(&full_line()).to_string().len(),
        );
        assert!(kept * 3 < full, "kept {kept} bytes of {full}");
    }

    proptest! {
        /// Whatever a LineItem holds or lacks (fields of any type, null or missing parts), the kept
        /// part plans the same line.
        #[test]
        fn the_kept_part_of_any_line_plans_the_same_line(
            id in proptest::option::of("[A-Z0-9]{0,3}"),
            fields in proptest::collection::btree_map(
                proptest::sample::select(vec!["ProductID", "Quantity", "LineTotal", "LineSubtotal",
                    "UnitPrice", "Product", "Variant", "Specs", "xp"]),
                prop_oneof![
                    Just(Value::Null),
                    "[A-Za-z0-9-]{0,6}".prop_map(Value::from),
                    (-5i64..50).prop_map(Value::from),
                    (-5.0f64..500.0).prop_map(Value::from),
                    ("[A-Z]{0,4}", "[a-z ]{0,8}", "[a-z]{0,6}").prop_map(|(id, name, category)|
                        json!({"ID": id, "Name": name, "Description": "long text", "xp": {"category": category}})),
                ],
                0..9,
            ),
            field in proptest::option::of(proptest::sample::select(vec!["category", "other"])),
        ) {
            let mut full: serde_json::Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if let Some(id) = id {
                full.insert("ID".into(), id.into());
            }
            let full = Value::Object(full);
            let cdp = CdpSettings { product_type_field: field.map(str::to_string), ..CdpSettings::default() };
            prop_assert_eq!(Line::from_json(&Line::kept(&full), &cdp), Line::from_json(&full, &cdp));
        }
    }

    #[test]
    fn total_falls_back_to_unit_price() {
        let cdp = CdpSettings::default();
        let l = Line::from_json(&json!({"ID":"L","ProductID":"P","Quantity":3,"UnitPrice":2.5}), &cdp).unwrap();
        assert_eq!(l.total, 7.5);
        assert!(Line::from_json(&json!({"ProductID":"P"}), &cdp).is_none());
    }
}
