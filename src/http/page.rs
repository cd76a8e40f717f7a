//! The human claim page: what a browser gets at `/r/:token`.
//!
//! The preview page shows what is waiting and a claim button; it loads no content. The button
//! is a plain form POST (works without JavaScript: the answer is a page with the text and
//! download links); with JavaScript the page claims with `fetch` and shows the result in place.
//! No external assets: one inline stylesheet and script, allowed by a per-response CSP nonce.
//! Link-preview bots only ever GET, and a GET never consumes.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::error::ApiError;
use crate::ids::format_millis;
use crate::service::{ClaimOutput, ClaimedContent, Preview};
use crate::state::Body;

/// Whether the client prefers HTML to JSON (a browser), by `Accept` q-values.
pub fn wants_html(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut html: Option<f32> = None;
    let mut json: Option<f32> = None;
    for part in accept.split(',') {
        let mut it = part.split(';');
        let ty = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
            })
            .unwrap_or(1.0);
        match ty.as_str() {
            "text/html" | "application/xhtml+xml" => html = Some(html.unwrap_or(0.0).max(q)),
            "application/json" => json = Some(json.unwrap_or(0.0).max(q)),
            _ => {}
        }
    }
    match (html, json) {
        (Some(h), Some(j)) => h > j,
        (Some(h), None) => h > 0.0,
        _ => false,
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn size(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;color:#1d2430}\
h1{font-size:1.4rem}table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #dde}\
button{font-size:1rem;padding:.6rem 1.2rem;border:0;border-radius:.4rem;background:#2b5fd9;color:#fff;cursor:pointer}\
pre{background:#f4f5f8;padding:.8rem;overflow:auto;white-space:pre-wrap;word-break:break-word}.muted{color:#667}\
.warn{background:#fff6dd;padding:.6rem;border-radius:.4rem}";

/// Renders the client-side claim: fetch the JSON claim and show text and download links.
const SCRIPT: &str = r#"
const form = document.getElementById('claim');
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const out = document.getElementById('result');
  form.querySelector('button').disabled = true;
  const r = await fetch(form.action, {method: 'POST', headers: {'Accept': 'application/json'}});
  const body = await r.json();
  out.replaceChildren();
  if (!r.ok) { const p = document.createElement('p'); p.className = 'warn'; p.textContent = body.message || ('HTTP ' + r.status); out.append(p); return; }
  const files = body.type === 'kubbi_package' ? body.files : [{name: 'content', content_type: body.content_type,
      content: typeof body.content === 'string' ? body.content : JSON.stringify(body.content, null, 2)}];
  for (const f of files) {
    const h = document.createElement('h2'); h.textContent = f.name; out.append(h);
    let bytes;
    if (f.encoding === 'base64') { const bin = atob(f.content); bytes = new Uint8Array(bin.length); for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i); }
    else { const pre = document.createElement('pre'); pre.className = 'content'; pre.textContent = f.content; out.append(pre); bytes = new TextEncoder().encode(f.content); }
    const a = document.createElement('a'); a.className = 'download'; a.download = f.name; a.textContent = 'Download ' + f.name;
    a.href = URL.createObjectURL(new Blob([bytes], {type: f.content_type})); out.append(a);
  }
  const note = document.createElement('p'); note.className = 'muted';
  note.textContent = body.burned ? 'This was the last allowed read: the payload is now destroyed.' : ('Reads left: ' + (body.remaining_reads ?? 'unlimited'));
  out.append(note);
  form.remove();
});
"#;

fn page(status: StatusCode, title: &str, body: &str, script: bool) -> Response {
    let nonce = crate::crypto::random_b64(16);
    let script = if script {
        format!("<script nonce=\"{}\">{SCRIPT}</script>", nonce.as_str())
    } else {
        String::new()
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex,nofollow\"><title>{}</title>\
         <style nonce=\"{n}\">{STYLE}</style></head><body>{body}{script}</body></html>",
        esc(title),
        n = nonce.as_str()
    );
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{n}'; script-src 'nonce-{n}'; connect-src 'self' blob:; \
         form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        n = nonce.as_str()
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-robots-tag",
        HeaderValue::from_static("noindex, nofollow"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    resp
}

/// The preview page: what is waiting and a claim button; no content.
pub fn preview(p: &Preview, claim_path: &str) -> Response {
    let r = &p.record;
    let mut rows = String::new();
    let what = match (&r.body, &p.files) {
        (
            Body::Package {
                file_count,
                total_size_bytes,
            },
            Some(files),
        ) => {
            for f in files {
                rows.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&f.name),
                    esc(&f.content_type),
                    size(f.size_bytes),
                    f.role.map(|r| r.as_str()).unwrap_or("")
                ));
            }
            format!(
                "<p>A package of {file_count} file(s), {} in all.</p>\
                 <table><tr><th>name</th><th>type</th><th>size</th><th>role</th></tr>{rows}</table>",
                size(*total_size_bytes)
            )
        }
        (Body::Single { content_type }, _) => {
            format!(
                "<p>One item of type <code>{}</code>.</p>",
                esc(content_type)
            )
        }
        _ => String::new(),
    };
    let reads = match r.remaining_reads() {
        Some(1) => {
            "This is the <strong>last allowed read</strong>: claiming destroys it.".to_string()
        }
        Some(n) => format!("{n} reads left."),
        None => "Unlimited reads until it expires.".to_string(),
    };
    let body = format!(
        "<h1>Something is waiting for you</h1>{what}\
         <p>{reads} Expires <time>{}</time>.</p>\
         <p class=\"muted\">Opening this page did not consume it. Nothing is shown until you claim it.</p>\
         <form id=\"claim\" method=\"post\" action=\"{}\"><button type=\"submit\">Claim now</button></form>\
         <div id=\"result\"></div>",
        format_millis(r.expires_at),
        esc(claim_path)
    );
    page(StatusCode::OK, "kubbi: something is waiting", &body, true)
}

/// The result of a claim made without JavaScript.
pub fn claimed(c: &ClaimOutput) -> Response {
    let mut body = String::from("<h1>Claimed</h1>");
    let mut show = |name: &str, content_type: &str, bytes: &[u8], text: bool| {
        body.push_str(&format!("<h2>{}</h2>", esc(name)));
        match std::str::from_utf8(bytes) {
            Ok(t) if text => body.push_str(&format!("<pre class=\"content\">{}</pre>", esc(t))),
            _ => {}
        }
        body.push_str(&format!(
            "<p><a class=\"download\" download=\"{}\" href=\"data:{};base64,{}\">Download {}</a></p>",
            esc(name),
            esc(content_type.split(';').next().unwrap_or("application/octet-stream")),
            STANDARD.encode(bytes),
            esc(name)
        ));
    };
    match (&c.record.body, &c.content) {
        (Body::Single { content_type }, ClaimedContent::Single(bytes)) => {
            show("content", content_type, bytes, true)
        }
        (_, ClaimedContent::Package(files)) => {
            for (f, bytes) in files {
                show(&f.name, &f.content_type, bytes, f.text);
            }
        }
        _ => {}
    }
    body.push_str(&format!(
        "<p class=\"muted\">{}</p>",
        if c.burned {
            "This was the last allowed read: the payload is now destroyed.".to_string()
        } else {
            match c.record.remaining_reads() {
                Some(n) => format!("Reads left: {n}"),
                None => "Reads left: unlimited".into(),
            }
        }
    ));
    page(StatusCode::OK, "kubbi: claimed", &body, false)
}

/// An error as a page (unknown, ended, unavailable).
pub fn error(e: &ApiError) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let title = match status.as_u16() {
        404 => "Nothing here",
        410 => "No longer available",
        _ => "Not available right now",
    };
    let body = format!("<h1>{}</h1><p>{}</p>", esc(title), esc(&e.message));
    page(status, title, &body, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn browsers_get_html_and_api_clients_json() {
        assert!(wants_html(&accept(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        )));
        assert!(!wants_html(&accept("application/json")));
        assert!(!wants_html(&accept("*/*")));
        assert!(!wants_html(&HeaderMap::new()));
        assert!(!wants_html(&accept("text/html;q=0.5, application/json")));
        assert!(wants_html(&accept("text/html")));
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
