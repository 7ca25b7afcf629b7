//! What is not synced: the agent's own state files, temporary files of
//! common editors, and whatever `.ferryignore` files (gitignore syntax) say.
//!
//! A `.ferryignore` applies to its directory and everything below it; a
//! deeper file overrides a shallower one, and `!pattern` re-includes, as in
//! git. An ignored directory hides everything under it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Name of the per-directory ignore file.
pub const IGNORE_FILE: &str = ".ferryignore";

/// Ignored everywhere unless a `.ferryignore` re-includes them: swap, backup
/// and atomic-save files of common editors, and ferry's own partial
/// downloads.
pub const DEFAULT_PATTERNS: &[&str] = &[
    // vim
    "*.swp",
    "*.swo",
    "*.swx",
    "4913",
    // vim, emacs, many others: backup files
    "*~",
    // emacs lock and auto-save files (a leading `#` starts a comment, hence `\\#`)
    ".#*",
    "\\#*#",
    // gedit and other GIO programs
    ".goutputstream-*",
    // kate
    "*.kate-swp",
    // LibreOffice and MS Office lock files
    ".~lock.*#",
    "~$*",
    // JetBrains safe-write files
    "*___jb_tmp___",
    "*___jb_old___",
    // atomic-save temporaries (many editors, sed -i, rsync)
    "*.tmp",
    ".*.sw?",
    // ferry get partial downloads and their records
    "*.ferry-part",
    "*.ferry-part.json",
    // an agent journal, also when this folder's journal is kept elsewhere
    ".ferry-agent/",
];

pub struct Filter {
    root: PathBuf,
    /// The agent's own files inside the root, relative to it (see
    /// `FolderSpec::own_paths_inside`).
    own: Vec<PathBuf>,
    defaults: Gitignore,
    /// Parsed `.ferryignore` of each directory seen (None: it has none).
    per_dir: Mutex<HashMap<PathBuf, Option<Gitignore>>>,
}

impl Filter {
    pub fn new(root: &Path, own: Vec<PathBuf>) -> Filter {
        let mut builder = GitignoreBuilder::new(root);
        for pattern in DEFAULT_PATTERNS {
            builder
                .add_line(None, pattern)
                .expect("default patterns are valid");
        }
        Filter {
            root: root.to_owned(),
            own,
            defaults: builder.build().expect("default patterns are valid"),
            per_dir: Mutex::default(),
        }
    }

    /// Forgets parsed `.ferryignore` files (one was edited).
    pub fn reload(&self) {
        self.per_dir.lock().unwrap().clear();
    }

    /// Whether `rel` (relative to the root) is left out of the sync, because
    /// it or a directory above it is ignored.
    pub fn is_ignored(&self, rel: &Path, is_dir: bool) -> bool {
        let mut ancestors: Vec<&Path> = rel
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty() && *a != rel)
            .collect();
        ancestors.reverse();
        ancestors.iter().any(|dir| self.excludes(dir, true)) || self.excludes(rel, is_dir)
    }

    /// The decision for `rel` itself, its parents taken as not ignored (as
    /// while walking down the tree).
    pub fn excludes(&self, rel: &Path, is_dir: bool) -> bool {
        if self.own.iter().any(|own| own == rel) {
            return true;
        }
        let mut ignored = matches!(self.defaults.matched(rel, is_dir), Match::Ignore(_));
        let mut cache = self.per_dir.lock().unwrap();
        let dirs = rel
            .ancestors()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev();
        for dir in dirs {
            let rules = cache
                .entry(dir.to_owned())
                .or_insert_with(|| load(&self.root, dir));
            let Some(rules) = rules else { continue };
            let below = rel.strip_prefix(dir).unwrap_or(rel);
            match rules.matched(below, is_dir) {
                Match::Ignore(_) => ignored = true,
                Match::Whitelist(_) => ignored = false,
                Match::None => {}
            }
        }
        ignored
    }
}

fn load(root: &Path, dir: &Path) -> Option<Gitignore> {
    let abs = root.join(dir);
    let file = abs.join(IGNORE_FILE);
    if !file.is_file() {
        return None;
    }
    let mut builder = GitignoreBuilder::new(&abs);
    if let Some(e) = builder.add(&file) {
        tracing::warn!(file = %file.display(), error = %e, "some lines of an ignore file were not understood");
    }
    match builder.build() {
        Ok(rules) => Some(rules),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignore file not used");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignored(f: &Filter, p: &str) -> bool {
        f.is_ignored(Path::new(p), false)
    }

    #[test]
    fn editor_temporaries_and_the_state_dir_are_ignored_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = Filter::new(dir.path(), vec![PathBuf::from(".ferry-agent")]);
        for p in [
            "a/.notes.txt.swp",
            "4913",
            "x/report.doc~",
            ".#draft.org",
            "#draft.org#",
            ".goutputstream-ABC123",
            "b/file.tmp",
            ".~lock.sheet.ods#",
            "~$letter.docx",
            ".ferry-agent/state.db",
            "big.iso.ferry-part",
            "dl/.big.iso.ferry-part.json",
        ] {
            assert!(ignored(&f, p), "{p} should be ignored");
        }
        assert!(f.is_ignored(Path::new("sub/.ferry-agent"), true));
        assert!(ignored(&f, "sub/.ferry-agent/state.db"));
        for p in ["notes.txt", "a/4913x", "swp", "temp/file", ".ferry-agentx"] {
            assert!(!ignored(&f, p), "{p} should be synced");
        }
    }

    #[test]
    fn ferryignore_files_nest_and_reinclude() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub/deep")).unwrap();
        std::fs::write(dir.path().join(IGNORE_FILE), "*.log\nbuild/\n").unwrap();
        std::fs::write(
            dir.path().join("sub").join(IGNORE_FILE),
            "!keep.log\nlocal*\n",
        )
        .unwrap();
        let f = Filter::new(dir.path(), Vec::new());
        assert!(ignored(&f, "a.log"));
        assert!(ignored(&f, "sub/deep/b.log"));
        assert!(!ignored(&f, "sub/keep.log"));
        assert!(ignored(&f, "sub/local.txt"));
        assert!(!ignored(&f, "local.txt"));
        assert!(ignored(&f, "build/out.bin"));
        assert!(f.is_ignored(Path::new("x/build"), true));
        assert!(ignored(&f, "x/build/y/z.c"));
        assert!(!ignored(&f, "src/main.rs"));
        // The ignore file itself is synced.
        assert!(!ignored(&f, IGNORE_FILE));

        std::fs::write(dir.path().join(IGNORE_FILE), "").unwrap();
        assert!(ignored(&f, "a.log"), "cached until reloaded");
        f.reload();
        assert!(!ignored(&f, "a.log"));
    }
}
