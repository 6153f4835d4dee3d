//! Sitecore CDP Stream API: event types with their wire names, and the client.

pub mod client;
pub mod events;
pub mod orders;

pub use client::{classify, AnswerHeaders, CdpClient, Outcome};
pub use events::{Event, EventKind, Identifier, OrderItem, OrderPayload, Product, SessionRef};
