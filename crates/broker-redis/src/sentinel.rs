//! Sentinel settings, from either spelling a user may know: the `redis+sentinel://` URL
//! (`redis+sentinel://[user:password@]host1:26379,host2:26379/MASTER[/DB]`, as Celery,
//! Kombu and many other Redis clients read it) or the `sentinels = [...]` list with
//! `sentinel_master`, where `url`'s credentials and database apply to the primary.

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, RedisConnectionInfo};

/// The scheme of the URL form.
pub const SCHEME: &str = "redis+sentinel://";

/// Port of a sentinel listed without one.
const DEFAULT_PORT: u16 = 26379;

/// Where the sentinels are and what to ask them for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `redis://host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// Database, user and password used on the primary.
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Settings {
    /// The settings for `url` when it is a `redis+sentinel://` URL (`None` otherwise);
    /// `default_master` serves when the URL names none.
    pub fn from_url(url: &str, default_master: &str) -> Option<Result<Settings, String>> {
        let rest = url.strip_prefix(SCHEME)?;
        Some(parse(rest, default_master))
    }

    /// The settings of the list form: `sentinels`, `master`, and the primary's database and
    /// credentials taken from `url` (a `redis://` URL; its host is unused).
    pub fn from_list(sentinels: &[String], master: &str, url: &str) -> Result<Settings, String> {
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        let redis = info.redis_settings();
        Ok(Settings {
            sentinels: sentinels.to_vec(),
            master: master.to_owned(),
            db: redis.db(),
            username: redis.username().map(str::to_owned),
            password: redis.password().map(str::to_owned),
        })
    }

    /// The client asking the sentinels for the current primary.
    pub fn client(&self) -> Result<SentinelClient, String> {
        let mut redis = RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &self.password {
            redis = redis.set_password(password);
        }
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
        SentinelClient::build(
            self.sentinels.clone(),
            self.master.clone(),
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(|e| e.to_string())
    }
}

fn parse(rest: &str, default_master: &str) -> Result<Settings, String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err("expected host:port of each sentinel, separated by commas".into());
        }
        let with_port =
            if host.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())) {
                host.to_owned()
            } else {
                format!("{host}:{DEFAULT_PORT}")
            };
        let sentinel = format!("redis://{with_port}");
        url::Url::parse(&sentinel)
            .ok()
            .filter(|u| u.host().is_some() && u.port().is_some())
            .ok_or_else(|| format!("sentinel {host:?} is not host:port"))?;
        sentinels.push(sentinel);
    }
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let master = parts.next().unwrap_or(default_master).to_owned();
    let db = match parts.next() {
        None => 0,
        Some(db) => db.parse().map_err(|_| format!("database {db:?} is not a number"))?,
    };
    if parts.next().is_some() {
        return Err("expected /MASTER or /MASTER/DB after the sentinels".into());
    }
    if master.is_empty() {
        return Err("the name the sentinels monitor the primary under is missing".into());
    }
    let (username, password) = match userinfo {
        None => (None, None),
        Some(userinfo) => {
            let parsed = url::Url::parse(&format!("redis://{userinfo}@localhost/"))
                .map_err(|e| format!("user and password: {e}"))?;
            let decode = |s: &str| {
                percent_decode(s).ok_or_else(|| "user or password is not UTF-8".to_owned())
            };
            let user = Some(parsed.username()).filter(|u| !u.is_empty()).map(decode).transpose()?;
            let password = parsed.password().map(decode).transpose()?;
            (user, password)
        }
    };
    Ok(Settings { sentinels, master, db, username, password })
}

/// `%XX` sequences decoded (what `url` leaves encoded in a user or password).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> Result<Settings, String> {
        Settings::from_url(url, "mymaster").expect("a sentinel URL")
    }

    #[test]
    fn the_url_form_lists_sentinels_master_db_and_credentials() {
        let s = parsed("redis+sentinel://app:p%40ss@10.0.0.1:26379,10.0.0.2,s3:26380/orders/2")
            .unwrap();
        assert_eq!(
            s.sentinels,
            ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://s3:26380"]
        );
        assert_eq!((s.master.as_str(), s.db), ("orders", 2));
        assert_eq!(s.username.as_deref(), Some("app"));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert!(s.client().is_ok());

        let bare = parsed("redis+sentinel://127.0.0.1:26379").unwrap();
        assert_eq!((bare.master.as_str(), bare.db, bare.password), ("mymaster", 0, None));
        let password_only = parsed("redis+sentinel://:secret@h:1/m").unwrap();
        assert_eq!(
            (password_only.username, password_only.password.as_deref()),
            (None, Some("secret"))
        );
    }

    #[test]
    fn bad_sentinel_urls_say_what_is_wrong() {
        assert!(parsed("redis+sentinel://h1:26379,,h2/m").unwrap_err().contains("commas"));
        assert!(parsed("redis+sentinel://h1:26379/m/x").unwrap_err().contains("not a number"));
        assert!(parsed("redis+sentinel://h1:26379/m/0/extra").unwrap_err().contains("/MASTER/DB"));
        assert!(parsed("redis+sentinel://h 1:26379/m").is_err());
        assert!(Settings::from_url("redis://h:1", "m").is_none());
    }

    #[test]
    fn the_list_form_takes_the_primary_credentials_from_url() {
        let s = Settings::from_list(&["redis://s:26379".into()], "m", "redis://:pw@x:1/3").unwrap();
        assert_eq!((s.db, s.password.as_deref(), s.master.as_str()), (3, Some("pw"), "m"));
    }
}
