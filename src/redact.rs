//! Showing configured URLs without their secrets. Webhook paths (Slack, Instatus integration
//! URLs), query strings (`?token=`) and userinfo carry credentials; wherever watchpost shows
//! a URL to a person (messages, logs, the CLI), it shows this form instead.

/// `https://user:pw@hooks.example.com/services/T0A1B2C3/XyZ123abc456?token=s3cret` →
/// `https://hooks.example.com/services/***/***?token=***`: no userinfo, every query value
/// and every path segment that looks like a token replaced. Not a URL → `***`.
pub fn redact_url(raw: &str) -> String {
    let Ok(u) = url::Url::parse(raw) else {
        return "***".into();
    };
    let mut out = format!("{}://", u.scheme());
    if let Some(host) = u.host_str() {
        out.push_str(host);
    }
    if let Some(port) = u.port() {
        out.push_str(&format!(":{port}"));
    }
    if let Some(segments) = u.path_segments() {
        for seg in segments {
            out.push('/');
            out.push_str(if looks_secret(seg) { "***" } else { seg });
        }
    }
    if u.query().is_some() {
        let q: Vec<String> = u.query_pairs().map(|(k, _)| format!("{k}=***")).collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// A path segment that may be a credential: long, or a mix of letters and digits that is
/// not a short version-like word (`v1`, `v2beta`).
fn looks_secret(seg: &str) -> bool {
    let letters = seg.chars().any(|c| c.is_ascii_alphabetic());
    let digits = seg.chars().filter(|c| c.is_ascii_digit()).count();
    seg.len() >= 16 || (letters && digits > 0 && seg.len() >= 6) || digits >= 6
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn secrets_are_gone_and_the_rest_stays_readable() {
        for (raw, want) in [
            (
                "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
                "https://hooks.slack.com/services/***/***/***",
            ),
            (
                "https://user:pw@api.example.com/v1/health?token=s3cret&x=1",
                "https://api.example.com/v1/health?token=***&x=***",
            ),
            (
                "https://api.instatus.com/v3/integrations/webhook/cl0abcdefghijklmnop",
                "https://api.instatus.com/v3/integrations/webhook/***",
            ),
            ("http://127.0.0.1:8080/alert", "http://127.0.0.1:8080/alert"),
            (
                "http://127.0.0.1:8080/hook/123456",
                "http://127.0.0.1:8080/hook/***",
            ),
            ("not a url with secret", "***"),
        ] {
            assert_eq!(redact_url(raw), want, "{raw}");
        }
    }
}
