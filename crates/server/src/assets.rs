//! The dashboard page and the browser client, embedded in the binary so the gateway works
//! offline with no files beside it.

use axum::body::Body;
use axum::http::{Response, StatusCode, header};

/// The embedded files: path, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("../../../web/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("../../../web/app.js")),
    ("/app.css", "text/css; charset=utf-8", include_str!("../../../web/app.css")),
    (
        "/client.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../clients/js/ferrocast.js"),
    ),
];

/// Paths served by [`serve`].
pub fn paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(p, _, _)| *p)
}

/// Serves the embedded file at `path`.
pub fn serve(path: &str) -> Response<Body> {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, body)) => Response::builder()
            .header(header::CONTENT_TYPE, *content_type)
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from(*body))
            .expect("static response"),
        None => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .expect("static response"),
    }
}
