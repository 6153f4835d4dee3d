//! Everything about OrderCloud: webhook signatures, the envelope, routes, token claims, and the
//! read client used with a shopper's token.

pub mod admin;
pub mod client;
pub mod envelope;
pub mod routes;
pub mod signature;
pub mod token;
