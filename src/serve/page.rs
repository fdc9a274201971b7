//! The inspection page at `GET /`: one self-contained HTML file (CSS and JavaScript inline,
//! nothing fetched from elsewhere) that talks to the server's own `/v1` API.

use super::http::Response;

const INDEX: &str = include_str!("page/index.html");

pub fn index() -> Response {
    Response {
        status: 200,
        content_type: "text/html; charset=utf-8",
        body: INDEX.as_bytes().to_vec(),
        headers: vec![("Cache-Control", "no-cache".to_string())],
    }
}
