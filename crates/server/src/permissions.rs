//! Who may subscribe to, publish into and read the history of a channel: one decision
//! function, [`decide`], that every transport reaches through the session and the HTTP API
//! calls for history, so the rules cannot drift between them.
//!
//! The order of checks: a connection that must authenticate and has not is `unauthorized`;
//! a user channel (`payments.eu#42`) admits only its users; then the namespace's rule
//! (`subscribe`, `publish`, `history`) applies. A `"proxy"` rule is answered
//! [`Verdict::AskProxy`]: the caller asks the application (see [`crate::proxy`]), which is
//! I/O this function does not do.

use ferrocast_hub::{HistoryRule, NamespaceConfig, PublishRule, SubscribeRule};
use ferrocast_protocol::{ErrorCode, channel_users, namespace_of};

use crate::auth::{Auth, Refusal};

/// What is being asked for.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Subscribing (also recovery and snapshots, which come with it), with the
    /// subscription token the client sent for the channel, if any.
    Subscribe { token: Option<&'a str> },
    /// Publishing from a client connection.
    Publish,
    /// Reading history over HTTP without the API key.
    History { token: Option<&'a str> },
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The user of the connection's token (empty for an anonymous token); `None` when no
    /// token has been accepted.
    pub user: Option<&'a str>,
}

impl Who<'_> {
    fn authenticated_user(&self) -> Option<&str> {
        self.user.filter(|u| !u.is_empty())
    }
}

/// A request the rules do not refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The namespace's rule is `"proxy"`: the application decides.
    AskProxy,
}

/// Decides whether `who` may do `action` on `channel` of namespace `ns`.
pub fn decide(
    auth: &Auth,
    ns: &NamespaceConfig,
    who: Who<'_>,
    channel: &str,
    action: Action<'_>,
) -> Result<Verdict, Refusal> {
    use Verdict::{Allowed, AskProxy};
    let namespace = namespace_of(channel);
    if who.user.is_none() && !auth.anonymous {
        return Err(Refusal::new(
            "no_token",
            ErrorCode::Unauthorized,
            "this server requires a token (auth.anonymous = false): send {\"op\":\"auth\",\"token\":...} first",
        ));
    }
    if let Some(mut users) = channel_users(channel) {
        let Some(user) = who.authenticated_user() else {
            return Err(Refusal::new(
                "user_channel",
                ErrorCode::Unauthorized,
                format!("{channel:?} is a user channel: connect with a token of one of its users"),
            ));
        };
        if !users.any(|u| u == user) {
            return Err(Refusal::new(
                "user_channel",
                ErrorCode::Forbidden,
                format!(
                    "{channel:?} is a user channel and this connection's user is not one of its users"
                ),
            ));
        }
    }
    let needs_user = |reason: &'static str, rule: &str| {
        Refusal::new(
            reason,
            ErrorCode::Unauthorized,
            format!(
                "namespace {namespace:?} needs an authenticated user ({rule}): connect with a token whose \"sub\" is set"
            ),
        )
    };
    let token = match action {
        Action::Publish => {
            return match ns.publish_rule() {
                PublishRule::Anyone => Ok(Allowed),
                PublishRule::Proxy => Ok(AskProxy),
                PublishRule::Authenticated => match who.authenticated_user() {
                    Some(_) => Ok(Allowed),
                    None => Err(needs_user("authenticated", "publish = \"authenticated\"")),
                },
                PublishRule::None => Err(Refusal::new(
                    "publish",
                    ErrorCode::Forbidden,
                    format!(
                        "namespace {namespace:?} does not allow client publishing (set namespaces.{namespace}.publish = \"anyone\", \"authenticated\" or \"proxy\")"
                    ),
                )),
            };
        }
        Action::History { .. } if ns.history == HistoryRule::Key => {
            return Err(Refusal::new(
                "history_key",
                ErrorCode::Unauthorized,
                format!("history of namespace {namespace:?} needs the API key (history = \"key\")"),
            ));
        }
        Action::Subscribe { token } | Action::History { token } => token,
    };
    match ns.subscribe {
        SubscribeRule::Anyone => Ok(Allowed),
        SubscribeRule::Proxy => Ok(AskProxy),
        SubscribeRule::Authenticated => match who.authenticated_user() {
            Some(_) => Ok(Allowed),
            None => Err(needs_user("authenticated", "subscribe = \"authenticated\"")),
        },
        SubscribeRule::Token => {
            let Some(token) = token else {
                return Err(Refusal::new(
                    "subscription_token",
                    ErrorCode::Forbidden,
                    format!(
                        "namespace {namespace:?} needs a subscription token for {channel:?} (subscribe = \"token\"): send it in \"tokens\""
                    ),
                ));
            };
            auth.verify_subscription(token, who.user.unwrap_or(""), channel).map(|()| Allowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthConfig;

    fn auth(anonymous: bool) -> Auth {
        let config = AuthConfig { hmac_secret: "k".into(), anonymous, ..AuthConfig::default() };
        Auth::from_config(&config, &[]).unwrap()
    }

    const SUB: Action<'static> = Action::Subscribe { token: None };

    #[test]
    fn user_channels_admit_only_their_users() {
        let a = auth(true);
        let ns = NamespaceConfig::default();
        let u42 = Who { user: Some("42") };
        assert!(decide(&a, &ns, u42, "payments.eu#42", SUB).is_ok());
        assert!(decide(&a, &ns, u42, "payments.eu#7,42", SUB).is_ok());
        let e = decide(&a, &ns, u42, "payments.eu#43", SUB).unwrap_err();
        assert_eq!((e.code, e.reason), (ErrorCode::Forbidden, "user_channel"));
        let e = decide(&a, &ns, Who { user: None }, "payments.eu#43", SUB).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        let e = decide(&a, &ns, Who { user: Some("") }, "payments.eu#43", SUB).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        let history = Action::History { token: None };
        assert!(decide(&a, &ns, u42, "payments.eu#43", history).is_err());
        assert!(decide(&a, &ns, u42, "payments.eu#42", history).is_ok());
    }

    #[test]
    fn namespace_rules() {
        let a = auth(true);
        let anon = Who { user: None };
        let user = Who { user: Some("1") };
        let ns = NamespaceConfig { subscribe: SubscribeRule::Authenticated, ..Default::default() };
        assert!(decide(&a, &ns, anon, "p.x", SUB).is_err());
        assert!(decide(&a, &ns, user, "p.x", SUB).is_ok());
        let history = Action::History { token: None };
        assert!(decide(&a, &ns, user, "p.x", history).is_ok());
        let keyed = NamespaceConfig { history: HistoryRule::Key, ..ns.clone() };
        assert_eq!(decide(&a, &keyed, user, "p.x", history).unwrap_err().reason, "history_key");

        let closed = NamespaceConfig::default();
        assert_eq!(
            decide(&a, &closed, user, "p.x", Action::Publish).unwrap_err().reason,
            "publish"
        );
        let old_name = NamespaceConfig { client_publish: true, ..Default::default() };
        assert!(decide(&a, &old_name, anon, "p.x", Action::Publish).is_ok());
        let authed = NamespaceConfig {
            client_publish: true,
            publish: Some(PublishRule::Authenticated),
            ..Default::default()
        };
        assert!(decide(&a, &authed, anon, "p.x", Action::Publish).is_err());
        assert!(decide(&a, &authed, user, "p.x", Action::Publish).is_ok());
    }

    #[test]
    fn proxy_rules_ask_the_application_after_the_user_channel_check() {
        let a = auth(true);
        let ns = NamespaceConfig {
            subscribe: SubscribeRule::Proxy,
            publish: Some(PublishRule::Proxy),
            ..Default::default()
        };
        let anon = Who { user: None };
        assert_eq!(decide(&a, &ns, anon, "p.x", SUB), Ok(Verdict::AskProxy));
        assert_eq!(decide(&a, &ns, anon, "p.x", Action::Publish), Ok(Verdict::AskProxy));
        let history = Action::History { token: None };
        assert_eq!(decide(&a, &ns, anon, "p.x", history), Ok(Verdict::AskProxy));
        let u42 = Who { user: Some("42") };
        assert_eq!(decide(&a, &ns, u42, "p.x#43", SUB).unwrap_err().reason, "user_channel");
    }

    #[test]
    fn anonymous_false_refuses_connections_without_a_token() {
        let a = auth(false);
        let ns = NamespaceConfig::default();
        let e = decide(&a, &ns, Who { user: None }, "p.x", SUB).unwrap_err();
        assert_eq!((e.code, e.reason), (ErrorCode::Unauthorized, "no_token"));
        assert!(decide(&a, &ns, Who { user: Some("") }, "p.x", SUB).is_ok());
    }

    #[test]
    fn subscription_token_rule() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let a = auth(true);
        let ns = NamespaceConfig { subscribe: SubscribeRule::Token, ..Default::default() };
        let user = Who { user: Some("42") };
        let sign = |claims: serde_json::Value| {
            encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k")).unwrap()
        };
        let good = sign(serde_json::json!({"sub":"42","channel":"p.x"}));
        assert!(decide(&a, &ns, user, "p.x", Action::Subscribe { token: Some(&good) }).is_ok());
        assert_eq!(decide(&a, &ns, user, "p.x", SUB).unwrap_err().reason, "subscription_token");
        let other_user = sign(serde_json::json!({"sub":"43","channel":"p.x"}));
        let e = decide(&a, &ns, user, "p.x", Action::Subscribe { token: Some(&other_user) });
        assert_eq!(e.unwrap_err().reason, "subscription_token_sub");
        let other_channel = sign(serde_json::json!({"sub":"42","channel":"p.y"}));
        let e = decide(&a, &ns, user, "p.x", Action::Subscribe { token: Some(&other_channel) });
        assert_eq!(e.unwrap_err().reason, "subscription_token_channel");
    }
}
