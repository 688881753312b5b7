//! Credentials out of URLs before they are logged or shown.
//!
//! Every URL the service logs or the admin API shows goes through [`url`]: broker URLs
//! (`nats://user:password@host`), the saga log's (`postgres://user:password@host/db`) and
//! callback URLs (`http://user:password@host/cb`).

/// Query parameters whose value is a credential (matched in lower case, as a substring).
const SECRET_PARAMS: [&str; 7] = ["pass", "pwd", "token", "secret", "key", "auth", "sig"];

/// `url` with its user information replaced by `***` (`scheme://***@host/path`) and the
/// values of credential-like query parameters (`password=`, `token=`, ...) too. A comma-separated
/// list of URLs (NATS servers) is redacted part by part. Where it is unclear where the user
/// information ends, more is hidden rather than less.
pub fn url(url: &str) -> String {
    url.split(',').map(one).collect::<Vec<_>>().join(",")
}

fn one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before_query, query) = rest.split_at(query_at);
    // The last `@` before the query ends the user information, even in a path: a password
    // with an unescaped `/` must not get through.
    let location = match before_query.rfind('@') {
        Some(at) => format!("***{}", &before_query[at..]),
        None => before_query.to_owned(),
    };
    format!("{scheme}{location}{}", redact_query(query))
}

/// `?a=1&password=x#f` → `?a=1&password=***#f`.
fn redact_query(query: &str) -> String {
    let Some(params) = query.strip_prefix('?') else { return query.to_owned() };
    let (params, fragment) = params.split_at(params.find('#').unwrap_or(params.len()));
    let redacted: Vec<String> = params
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("?{}{fragment}", redacted.join("&"))
}

fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn user_information_is_hidden() {
        assert_eq!(url("nats://alice:s3cret@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
        assert_eq!(url("postgres://saga:pw@db:5432/test"), "postgres://***@db:5432/test");
        assert_eq!(url("http://u:p@[::1]:8080/cb?x=1"), "http://***@[::1]:8080/cb?x=1");
        assert_eq!(url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://***@127.0.0.1:5672/%2f");
        assert_eq!(url("nats://tok@a:4222,nats://u:p@b:4222"), "nats://***@a:4222,nats://***@b:4222");
        assert_eq!(url("user:pw@localhost:4222"), "***@localhost:4222");
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        for plain in ["http://127.0.0.1:9/cb", "nats://127.0.0.1:4222", "./data", "", "http://h/cb?a=1#top"] {
            assert_eq!(url(plain), plain);
        }
    }

    #[test]
    fn odd_urls_hide_more_rather_than_less() {
        // An unescaped `/` in the password: everything up to the last `@` goes.
        assert_eq!(url("postgres://u:pa/ss@db/test"), "postgres://***@db/test");
        assert!(!url("postgres://u:p@ss@db/test").contains("p@ss"));
    }

    #[test]
    fn credential_query_parameters_are_hidden() {
        assert_eq!(
            url("postgres://db/test?user=saga&password=hunter2&sslmode=require"),
            "postgres://db/test?user=saga&password=***&sslmode=require"
        );
        assert_eq!(url("http://h/cb?token=abc&x=1#f"), "http://h/cb?token=***&x=1#f");
        assert_eq!(url("http://h/cb?API_KEY=abc"), "http://h/cb?API_KEY=***");
    }
}
