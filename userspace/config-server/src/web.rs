//! The website (stub while it is built).
use crate::App;
use axum::Router;
use std::sync::Arc;
pub fn routes() -> Router<Arc<App>> {
    Router::new()
}
