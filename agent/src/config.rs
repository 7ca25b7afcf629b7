//! Folder pairs and settings, from the command line or a TOML file.
//!
//! ```toml
//! server = "http://127.0.0.1:7070"
//! transfers = 4
//! bwlimit = "10M"
//! rescan_interval = "1h"
//! max_settle_delay = "60s"
//!
//! [[folder]]
//! dir = "/home/me/Documents"
//! prefix = "laptop/documents"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry::protocol::RemotePath;
use serde::Deserialize;

/// Name of the state directory kept inside a synced folder by default.
pub const STATE_DIR: &str = ".ferry-agent";
const STATE_FILE: &str = "state.db";
pub const DEFAULT_TRANSFERS: usize = 4;
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(3600);

/// One local folder and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderSpec {
    pub dir: PathBuf,
    pub server: String,
    pub prefix: RemotePath,
    /// The journal file.
    pub state: PathBuf,
    pub max_delete: Option<u64>,
}

impl FolderSpec {
    /// The agent's own files where they lie inside the folder, relative to
    /// it (left out of the sync): their directory when it is below the
    /// folder, else (the journal kept in the folder itself) each of them:
    /// the journal, its write-ahead log and shared memory, and the lock.
    pub fn own_paths_inside(&self) -> Vec<PathBuf> {
        let Some(rel) = self
            .state
            .parent()
            .and_then(|dir| dir.strip_prefix(&self.dir).ok())
        else {
            return Vec::new();
        };
        if !rel.as_os_str().is_empty() {
            return vec![rel.to_owned()];
        }
        let Some(name) = self.state.file_name().and_then(|n| n.to_str()) else {
            return Vec::new();
        };
        let journal = ["", "-wal", "-shm", "-journal"].map(|suffix| format!("{name}{suffix}"));
        journal
            .into_iter()
            .map(PathBuf::from)
            .chain(self.lock_path().file_name().map(PathBuf::from))
            .collect()
    }

    /// The file an agent holds locked while it syncs this folder.
    pub fn lock_path(&self) -> PathBuf {
        self.state.with_extension("lock")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub folders: Vec<FolderSpec>,
    pub transfers: usize,
    pub bwlimit: Option<u64>,
    pub rescan_interval: Duration,
    /// How long a file that keeps changing waits before a snapshot of it is
    /// pushed anyway.
    pub max_settle_delay: Duration,
}

/// The TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: Option<String>,
    transfers: Option<usize>,
    bwlimit: Option<ByteCount>,
    rescan_interval: Option<String>,
    max_settle_delay: Option<String>,
    max_delete: Option<u64>,
    #[serde(default, rename = "folder")]
    folders: Vec<FolderEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FolderEntry {
    dir: PathBuf,
    server: Option<String>,
    prefix: Option<String>,
    state: Option<PathBuf>,
    max_delete: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ByteCount {
    Number(u64),
    Text(String),
}

/// Settings given on the command line; they override the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub dir: Option<PathBuf>,
    pub server: Option<String>,
    pub prefix: Option<String>,
    pub state: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub transfers: Option<usize>,
    pub bwlimit: Option<u64>,
    pub rescan_interval: Option<Duration>,
    pub max_settle_delay: Option<Duration>,
    pub max_delete: Option<u64>,
}

impl Settings {
    /// Settings for `run` and `once`: a server is needed.
    pub fn resolve(o: &Overrides) -> Result<Settings> {
        Self::build(o, true)
    }

    /// Settings for `status`: only where the journals are.
    pub fn resolve_for_status(o: &Overrides) -> Result<Settings> {
        Self::build(o, false)
    }

    fn build(o: &Overrides, need_server: bool) -> Result<Settings> {
        let mut settings = Settings {
            folders: Vec::new(),
            transfers: DEFAULT_TRANSFERS,
            bwlimit: None,
            rescan_interval: DEFAULT_RESCAN,
            max_settle_delay: crate::settle::DEFAULT_MAX_DELAY,
        };
        match (&o.config, &o.dir) {
            (Some(_), Some(_)) => bail!("give either --config or --dir, not both"),
            (None, None) => {
                bail!("nothing to sync: give --dir DIR (with --server URL) or --config FILE")
            }
            (Some(file), None) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading the config file {}", file.display()))?;
                let parsed: ConfigFile = toml::from_str(&text)
                    .with_context(|| format!("in the config file {}", file.display()))?;
                if parsed.folders.is_empty() {
                    bail!("{}: no [[folder]] entries", file.display());
                }
                let base = file.parent().unwrap_or(Path::new("."));
                if let Some(n) = parsed.transfers {
                    settings.transfers = n;
                }
                if let Some(rate) = parsed.bwlimit {
                    settings.bwlimit = Some(match rate {
                        ByteCount::Number(n) => n,
                        ByteCount::Text(t) => ferry::cli::parse_bytes(&t)
                            .map_err(|e| anyhow::anyhow!("{}: bwlimit: {e}", file.display()))?,
                    });
                }
                if let Some(text) = &parsed.rescan_interval {
                    settings.rescan_interval = parse_duration(text)
                        .map_err(|e| anyhow::anyhow!("{}: rescan_interval: {e}", file.display()))?;
                }
                if let Some(text) = &parsed.max_settle_delay {
                    settings.max_settle_delay = parse_duration(text).map_err(|e| {
                        anyhow::anyhow!("{}: max_settle_delay: {e}", file.display())
                    })?;
                }
                for entry in parsed.folders {
                    let server = o.server.clone().or(entry.server).or(parsed.server.clone());
                    let dir = if entry.dir.is_relative() {
                        base.join(&entry.dir)
                    } else {
                        entry.dir
                    };
                    settings.folders.push(folder(
                        &dir,
                        server,
                        entry.prefix.as_deref(),
                        entry.state.as_deref(),
                        o.max_delete.or(entry.max_delete).or(parsed.max_delete),
                        need_server,
                    )?);
                }
            }
            (None, Some(dir)) => {
                settings.folders.push(folder(
                    dir,
                    o.server.clone(),
                    o.prefix.as_deref(),
                    o.state.as_deref(),
                    o.max_delete,
                    need_server,
                )?);
            }
        }
        if let Some(n) = o.transfers {
            settings.transfers = n;
        }
        if settings.transfers == 0 {
            bail!("transfers must be at least 1");
        }
        if let Some(rate) = o.bwlimit {
            settings.bwlimit = Some(rate);
        }
        if settings.bwlimit == Some(0) {
            bail!("bwlimit must be more than 0 bytes per second");
        }
        if let Some(every) = o.rescan_interval {
            settings.rescan_interval = every;
        }
        if let Some(delay) = o.max_settle_delay {
            settings.max_settle_delay = delay;
        }
        for (i, a) in settings.folders.iter().enumerate() {
            for b in &settings.folders[i + 1..] {
                if a.dir.starts_with(&b.dir) || b.dir.starts_with(&a.dir) {
                    bail!(
                        "folders {} and {} overlap; each file must belong to one folder",
                        a.dir.display(),
                        b.dir.display()
                    );
                }
                // Each folder's deletes and renames mirror it alone: two
                // folders writing one remote tree would undo each other.
                let same_server = a.server.trim_end_matches('/') == b.server.trim_end_matches('/');
                if same_server
                    && (a.prefix.starts_with(&b.prefix) || b.prefix.starts_with(&a.prefix))
                {
                    bail!(
                        "folders {} and {} sync to overlapping places on {} (prefixes {:?} and {:?}); \
                         each remote file must belong to one folder",
                        a.dir.display(),
                        b.dir.display(),
                        a.server,
                        a.prefix.as_str(),
                        b.prefix.as_str()
                    );
                }
            }
        }
        Ok(settings)
    }
}

/// `path` with its longest existing ancestor made canonical (symlinks and
/// `..` resolved); the rest, not there yet, as given.
fn resolved(path: &Path) -> PathBuf {
    for ancestor in path.ancestors().skip(1) {
        if let Ok(real) = std::fs::canonicalize(ancestor) {
            let rest = path
                .strip_prefix(ancestor)
                .expect("an ancestor of the path");
            return real.join(rest);
        }
    }
    path.to_owned()
}

fn folder(
    dir: &Path,
    server: Option<String>,
    prefix: Option<&str>,
    state: Option<&Path>,
    max_delete: Option<u64>,
    need_server: bool,
) -> Result<FolderSpec> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("the folder {} cannot be used", dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let server = match server {
        Some(s) => s,
        None if need_server => bail!(
            "no server for {}: give --server URL (or FERRY_SERVER, or server = \"...\" in the config file)",
            dir.display()
        ),
        None => String::new(),
    };
    let prefix = match prefix {
        Some(p) => RemotePath::parse(p.trim_matches('/'))
            .map_err(|e| anyhow::anyhow!("prefix {p:?}: {e}"))?,
        None => RemotePath::root(),
    };
    let state = match state {
        Some(path) if path.extension().is_none() || path.is_dir() => path.join(STATE_FILE),
        Some(path) => path.to_owned(),
        None => dir.join(STATE_DIR).join(STATE_FILE),
    };
    let state = if state.is_relative() {
        std::env::current_dir()?.join(state)
    } else {
        state
    };
    // Compared with the (canonical) folder to tell whether it lies inside.
    let state = resolved(&state);
    Ok(FolderSpec {
        dir,
        server,
        prefix,
        state,
        max_delete,
    })
}

/// `90`, `90s`, `15m`, `1h` or `1d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 90s, 15m, 1h)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use s, m, h or d)"
            ));
        }
    };
    if n == 0 {
        return Err("the interval must be more than 0".into());
    }
    Ok(Duration::from_secs(n * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn a_config_file_with_two_folders() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a")).unwrap();
        std::fs::create_dir_all(tmp.path().join("b")).unwrap();
        let file = tmp.path().join("agent.toml");
        std::fs::write(
            &file,
            r#"
server = "http://127.0.0.1:7070"
transfers = 8
bwlimit = "2M"
rescan_interval = "30m"
max_settle_delay = "5m"

[[folder]]
dir = "a"
prefix = "/backup/a/"

[[folder]]
dir = "b"
server = "http://10.0.0.2:7070"
state = "/var/lib/ferry-agent/b.db"
max_delete = 10
"#,
        )
        .unwrap();
        let s = Settings::resolve(&Overrides {
            config: Some(file),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.transfers, 8);
        assert_eq!(s.bwlimit, Some(2 << 20));
        assert_eq!(s.rescan_interval, Duration::from_secs(1800));
        assert_eq!(s.max_settle_delay, Duration::from_secs(300));
        let a = &s.folders[0];
        assert_eq!(a.prefix.as_str(), "backup/a");
        assert_eq!(a.server, "http://127.0.0.1:7070");
        assert!(a.state.ends_with(".ferry-agent/state.db"));
        assert_eq!(a.own_paths_inside(), [PathBuf::from(STATE_DIR)]);
        let b = &s.folders[1];
        assert_eq!(b.server, "http://10.0.0.2:7070");
        assert_eq!(b.state, PathBuf::from("/var/lib/ferry-agent/b.db"));
        assert!(b.own_paths_inside().is_empty());
        assert_eq!(b.max_delete, Some(10));
    }

    #[test]
    fn bad_settings_get_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("agent.toml");
        std::fs::write(&file, "[[folder]]\ndir = \".\"\ncolour = \"blue\"\n").unwrap();
        let err = Settings::resolve(&Overrides {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");

        std::fs::write(&file, "[[folder]]\ndir = \".\"\n").unwrap();
        let err = Settings::resolve(&Overrides {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("--server"), "{err:#}");

        let err = Settings::resolve(&Overrides {
            dir: Some(tmp.path().join("missing")),
            server: Some("http://x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("cannot be used"), "{err:#}");

        let err = Settings::resolve(&Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("--dir"));
    }

    #[test]
    fn two_folders_syncing_to_one_remote_tree_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a")).unwrap();
        std::fs::create_dir_all(tmp.path().join("b")).unwrap();
        let file = tmp.path().join("agent.toml");
        let resolve = |a: &str, b: &str, b_server: &str| {
            std::fs::write(
                &file,
                format!(
                    "server = \"http://h:7070\"\n\
                     [[folder]]\ndir = \"a\"\n{a}\n\
                     [[folder]]\ndir = \"b\"\n{b}\n{b_server}\n"
                ),
            )
            .unwrap();
            Settings::resolve(&Overrides {
                config: Some(file.clone()),
                ..Default::default()
            })
        };
        for (a, b) in [
            ("prefix = \"x\"", "prefix = \"/x/\""),
            ("prefix = \"x\"", "prefix = \"x/y\""),
            ("prefix = \"x/y\"", "prefix = \"x\""),
            ("", "prefix = \"x\""),
            ("", ""),
        ] {
            let err = resolve(a, b, "").unwrap_err();
            assert!(
                format!("{err:#}").contains("overlapping"),
                "{a} / {b}: {err:#}"
            );
            // The same server however its URL ends.
            let err = resolve(a, b, "server = \"http://h:7070/\"").unwrap_err();
            assert!(
                format!("{err:#}").contains("overlapping"),
                "{a} / {b}: {err:#}"
            );
        }
        // Siblings, a name that only begins alike, or another server: fine.
        resolve("prefix = \"x\"", "prefix = \"y\"", "").unwrap();
        resolve("prefix = \"x\"", "prefix = \"xy\"", "").unwrap();
        resolve(
            "prefix = \"x\"",
            "prefix = \"x\"",
            "server = \"http://other:7070\"",
        )
        .unwrap();
    }
}
