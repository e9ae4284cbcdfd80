//! Server-rendered HTML: the home page and the error pages. No JavaScript;
//! every value that came from a user is escaped.

use std::fmt::Write;

use crate::store::Link;

/// Escapes text for an HTML element body or a double-quoted attribute.
pub fn escape(s: &str) -> String {
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

const STYLE: &str = "
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:46rem;margin:0 auto;padding:1rem;color:#1d232a;background:#fafbfc;line-height:1.45}
h1{font-size:1.6rem;margin:.5rem 0}h1 small{font-weight:normal;color:#5b6570;font-size:.95rem}
form{display:flex;gap:.5rem;flex-wrap:wrap;margin:1rem 0}
input[type=url]{flex:1 1 16rem;padding:.6rem;font-size:1rem;border:1px solid #b8c0c8;border-radius:.4rem}
button{padding:.6rem 1.1rem;font-size:1rem;border:0;border-radius:.4rem;background:#1f6feb;color:#fff}
.msg{padding:.6rem .8rem;border-radius:.4rem;margin:.5rem 0}.err{background:#fde8e8;color:#8a1c1c}.ok{background:#e6f4ea;color:#1e5631}
ol{padding-left:0;list-style:none}li{padding:.5rem 0;border-bottom:1px solid #e3e7eb;overflow-wrap:anywhere}
li a.code{font-family:ui-monospace,monospace;font-weight:600;margin-right:.5rem}li .url{color:#5b6570}
li time{display:block;color:#8a949e;font-size:.8rem}
footer{margin-top:2rem;color:#5b6570;font-size:.85rem;border-top:1px solid #e3e7eb;padding-top:.5rem}
";

/// What the home page shows besides the form.
pub struct HomePage<'a> {
    pub links: &'a [Link],
    /// A message after a failed form post, and the URL the user typed.
    pub error: Option<(&'a str, &'a str)>,
    /// The short URL of a link just created through the form.
    pub created: Option<&'a str>,
    /// Its delete token, shown once.
    pub delete_token: Option<&'a str>,
    /// Base for short URLs, e.g. `http://127.0.0.1:8080`.
    pub base: &'a str,
    pub web_server: &'a str,
    pub db_node: &'a str,
}

pub fn home(page: &HomePage<'_>) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>links · scaleout</title><style>",
    );
    out.push_str(STYLE);
    out.push_str(
        "</style></head><body><header><h1>links <small>a URL shortener on scaleout</small></h1></header><main>",
    );
    let typed = page.error.map(|(_, url)| url).unwrap_or("");
    if let Some((message, _)) = page.error {
        let _ = write!(
            out,
            "<p class=\"msg err\" role=\"alert\">{}</p>",
            escape(message)
        );
    }
    if let Some(short) = page.created {
        let short = escape(short);
        let _ = write!(
            out,
            "<p class=\"msg ok\">Created <a href=\"{short}\">{short}</a></p>"
        );
        if let Some(token) = page.delete_token {
            let _ = write!(
                out,
                "<p class=\"msg ok\">Its delete token, shown once: <code id=\"delete-token\">{}</code> \
                 (<code>DELETE /api/links/CODE</code> with <code>Authorization: Bearer</code> it).</p>",
                escape(token)
            );
        }
    }
    let _ = write!(
        out,
        "<form method=\"post\" action=\"/links\"><label for=\"url\" hidden>URL to shorten</label>\
         <input type=\"url\" id=\"url\" name=\"url\" placeholder=\"https://example.com/a/long/page\" \
         required maxlength=\"2048\" value=\"{}\"><button type=\"submit\">Shorten</button></form>",
        escape(typed)
    );
    let _ = write!(out, "<h2>Newest links</h2>");
    if page.links.is_empty() {
        out.push_str("<p>No links yet. Shorten the first one above.</p>");
    } else {
        out.push_str("<ol>");
        for link in page.links {
            let code = escape(&link.code);
            let _ = write!(
                out,
                "<li><a class=\"code\" href=\"/{code}\">{base}/{code}</a>\
                 <span class=\"url\">{url}</span><time datetime=\"{at}\">{at}</time></li>",
                base = escape(page.base),
                url = escape(&link.url),
                at = escape(&link.created_at),
            );
        }
        out.push_str("</ol>");
    }
    let _ = write!(
        out,
        "</main><footer>Served by web server <strong id=\"web-server\">{}</strong> \
         from database node <strong id=\"db-node\">{}</strong>.</footer></body></html>",
        escape(page.web_server),
        escape(page.db_node)
    );
    out
}

/// A small page for errors met on HTML routes (unknown code, bad form post).
pub fn error_page(title: &str, message: &str, web_server: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · scaleout</title><style>{STYLE}</style></head><body>\
         <h1>{title}</h1><p>{message}</p><p><a href=\"/\">Back to links</a></p>\
         <footer>Served by web server <strong id=\"web-server\">{server}</strong>.</footer></body></html>",
        title = escape(title),
        message = escape(message),
        server = escape(web_server),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn home_escapes_user_content_and_names_servers() {
        let links = [Link {
            code: "abc".into(),
            url: "https://x/?q=<script>".into(),
            created_at: "t".into(),
            delete_hash: None,
        }];
        let page = home(&HomePage {
            links: &links,
            error: Some(("bad \"url\"", "<typed>")),
            created: None,
            delete_token: None,
            base: "http://h",
            web_server: "web-1",
            db_node: "db-<1>",
        });
        assert!(!page.contains("<script>"));
        assert!(page.contains("https://x/?q=&lt;script&gt;"));
        assert!(page.contains("value=\"&lt;typed&gt;\""));
        assert!(page.contains("bad &quot;url&quot;"));
        assert!(page.contains("<strong id=\"web-server\">web-1</strong>"));
        assert!(page.contains("<strong id=\"db-node\">db-&lt;1&gt;</strong>"));
        assert!(page.contains("href=\"/abc\""));
    }
}
