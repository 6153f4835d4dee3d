//! The forwarder's record of a cart's lines, kept from line webhooks so that later events can be
//! built without OrderCloud.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A cart line as last seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartLine {
    pub order_id: String,
    pub line_id: String,
    pub shopper_key: String,
    /// The LineItem JSON as OrderCloud returned it, or (recorded since issue 23) the part of it the
    /// planner reads: [`crate::planner::lines::Line::kept`].
    pub line: Value,
    pub updated_at_ms: i64,
}
