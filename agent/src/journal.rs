//! The state journal: what the agent last pushed for each path, the upload
//! sessions in progress, recent errors and a few facts for `status`.
//!
//! One SQLite file per synced folder. A path's record is written only after
//! the server committed that exact version, so a crash at any point leaves
//! the journal describing what the remote really holds (or an older state,
//! which the next pass repairs by comparing again).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

/// Errors kept for `status`; older ones are dropped.
const ERRORS_KEPT: i64 = 200;

/// What a local file looked like: enough to recognise it unchanged without
/// reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    pub inode: u64,
}

/// The last version of a path the server committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub path: String,
    pub stamp: FileStamp,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// The remote file's etag right after the commit.
    pub etag: String,
    /// The remote file at `path` is not this content: a conflict left the
    /// other writer's version there (`etag` is its) and put ours beside it.
    /// The agent never pushed it, so neither a local rename nor a delete is
    /// passed on to it; a local edit is (see docs/AGENT.md, Conflicts).
    pub diverged: bool,
}

/// An upload session that has been started and not yet committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub path: String,
    /// Where the session commits (the path, or a conflict name beside it).
    pub target: String,
    pub session_id: String,
    pub stamp: FileStamp,
    pub sha256: String,
}

/// A server-side rename that was sent and not yet recorded: a run killed
/// between the two leaves it here for the next start to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMove {
    pub from: String,
    pub to: String,
    pub dir: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEntry {
    pub at: String,
    pub path: String,
    pub message: String,
}

pub struct Journal {
    conn: Mutex<Connection>,
    /// False only for a journal opened read-only from before that column.
    diverged_column: bool,
}

fn has_diverged_column(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = 'diverged'")?
        .exists([])?)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    etag TEXT NOT NULL,
    diverged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_by_inode ON files (inode);
CREATE TABLE IF NOT EXISTS pending (
    path TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    session_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    from_path TEXT PRIMARY KEY,
    to_path TEXT NOT NULL,
    dir INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    path TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

impl Journal {
    /// Opens (creating) the journal at `path`.
    pub fn open(path: &Path) -> Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the state directory {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the state journal {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("preparing the state journal {}", path.display()))?;
        if !has_diverged_column(&conn)? {
            // A journal from before the column.
            conn.execute(
                "ALTER TABLE files ADD COLUMN diverged INTEGER NOT NULL DEFAULT 0",
                [],
            )?;
        }
        Ok(Journal {
            conn: Mutex::new(conn),
            diverged_column: true,
        })
    }

    /// Opens an existing journal without writing to it (`status`, `--dry-run`).
    pub fn open_read_only(path: &Path) -> Result<Journal> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening the state journal {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // Read as it is: one from before the column has no diverged record.
        let diverged_column = has_diverged_column(&conn)?;
        Ok(Journal {
            conn: Mutex::new(conn),
            diverged_column,
        })
    }

    /// An empty journal in memory (a dry run of a folder never synced).
    pub fn in_memory() -> Result<Journal> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Journal {
            conn: Mutex::new(conn),
            diverged_column: true,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The columns of a record, as [`record_from_row`] reads them.
    fn record_columns(&self) -> &'static str {
        match self.diverged_column {
            true => "path, size, mtime_ns, inode, sha256, etag, diverged",
            false => "path, size, mtime_ns, inode, sha256, etag, 0",
        }
    }

    /// Records at `scope` or below it (`""` is everything).
    pub fn records_under(&self, scope: &str) -> Result<BTreeMap<String, Record>> {
        let conn = self.conn();
        let columns = self.record_columns();
        // A key range ('0' follows '/'), so that the index serves it.
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {columns} FROM files WHERE path = ?1 OR (path >= ?2 AND path < ?3)"
        ))?;
        let mut stmt_all = conn.prepare_cached(&format!("SELECT {columns} FROM files"))?;
        let rows = if scope.is_empty() {
            stmt_all.query_map([], record_from_row)?
        } else {
            stmt.query_map(
                params![scope, format!("{scope}/"), format!("{scope}0")],
                record_from_row,
            )?
        };
        let mut out = BTreeMap::new();
        for row in rows {
            let record = row?;
            out.insert(record.path.clone(), record);
        }
        Ok(out)
    }

    /// Records whose file had inode `inode` when it was pushed: the other
    /// names of a hard-linked file (or, on another file system below the
    /// folder, unrelated files that share the number).
    pub fn records_with_inode(&self, inode: u64) -> Result<Vec<Record>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM files WHERE inode = ?1 ORDER BY path",
            self.record_columns()
        ))?;
        let rows = stmt.query_map([inode as i64], record_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn record(&self, path: &str) -> Result<Option<Record>> {
        Ok(self.records_under(path)?.remove(path))
    }

    pub fn count_records(&self) -> Result<(u64, u64)> {
        let conn = self.conn();
        let (n, bytes): (i64, Option<i64>) =
            conn.query_row("SELECT count(*), sum(size) FROM files", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        Ok((n as u64, bytes.unwrap_or(0) as u64))
    }

    /// Stores a committed version and forgets the session that made it.
    pub fn commit(&self, record: &Record) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO files (path, size, mtime_ns, inode, sha256, etag, diverged)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                record.path,
                record.stamp.size as i64,
                record.stamp.mtime_ns,
                record.stamp.inode as i64,
                record.sha256,
                record.etag,
                record.diverged
            ],
        )?;
        tx.execute("DELETE FROM pending WHERE path = ?1", [&record.path])?;
        tx.commit()?;
        Ok(())
    }

    pub fn forget(&self, path: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute("DELETE FROM files WHERE path = ?1", [path])?;
        conn.execute("DELETE FROM pending WHERE path = ?1", [path])?;
        Ok(())
    }

    /// Moves the record of `from` (a file, or a directory with everything
    /// under it) to `to`, after the server renamed it.
    ///
    /// A row already at a path a moved one takes (an upload of the new name
    /// that failed, say) is dropped: the server renames only onto a free
    /// name, so it has nothing of it there. Kept, it would fail the move
    /// after the server made it.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["files", "pending"] {
            tx.execute(
                &format!(
                    "DELETE FROM {table} WHERE path IN (
                         SELECT ?2 || substr(path, length(?1) + 1) FROM {table}
                         WHERE path = ?1 OR substr(path, 1, length(?1) + 1) = ?1 || '/')"
                ),
                params![from, to],
            )?;
            tx.execute(
                &format!(
                    "UPDATE {table} SET path = ?2 || substr(path, length(?1) + 1)
                     WHERE path = ?1 OR substr(path, 1, length(?1) + 1) = ?1 || '/'"
                ),
                params![from, to],
            )?;
        }
        tx.execute("DELETE FROM moves WHERE from_path = ?1", [from])?;
        tx.commit()?;
        Ok(())
    }

    /// Notes a rename about to be sent to the server.
    pub fn begin_move(&self, m: &PendingMove) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO moves (from_path, to_path, dir) VALUES (?1, ?2, ?3)",
            params![m.from, m.to, m.dir],
        )?;
        Ok(())
    }

    /// Forgets a rename the server did not make.
    pub fn clear_move(&self, from: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM moves WHERE from_path = ?1", [from])?;
        Ok(())
    }

    /// Renames sent and not recorded, oldest first.
    pub fn pending_moves(&self) -> Result<Vec<PendingMove>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT from_path, to_path, dir FROM moves ORDER BY rowid")?;
        let rows = stmt.query_map([], |row| {
            Ok(PendingMove {
                from: row.get(0)?,
                to: row.get(1)?,
                dir: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_etag(&self, path: &str, etag: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE files SET etag = ?2 WHERE path = ?1",
            params![path, etag],
        )?;
        Ok(())
    }

    pub fn pending(&self, path: &str) -> Result<Option<Pending>> {
        let conn = self.conn();
        conn.query_row(
            "SELECT path, target, session_id, size, mtime_ns, inode, sha256 FROM pending WHERE path = ?1",
            [path],
            pending_from_row,
        )
        .optional()
        .map_err(Into::into)
    }

    pub fn all_pending(&self) -> Result<Vec<Pending>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT path, target, session_id, size, mtime_ns, inode, sha256 FROM pending ORDER BY path",
        )?;
        let rows = stmt.query_map([], pending_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_pending(&self, pending: &Pending) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO pending (path, target, session_id, size, mtime_ns, inode, sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                pending.path,
                pending.target,
                pending.session_id,
                pending.stamp.size as i64,
                pending.stamp.mtime_ns,
                pending.stamp.inode as i64,
                pending.sha256
            ],
        )?;
        Ok(())
    }

    pub fn clear_pending(&self, path: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM pending WHERE path = ?1", [path])?;
        Ok(())
    }

    pub fn add_error(&self, path: &str, message: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO errors (at, path, message) VALUES (?1, ?2, ?3)",
            params![now_text(), path, message],
        )?;
        conn.execute(
            "DELETE FROM errors WHERE id <= (SELECT max(id) FROM errors) - ?1",
            [ERRORS_KEPT],
        )?;
        Ok(())
    }

    /// The most recent errors, newest first.
    pub fn recent_errors(&self, limit: usize) -> Result<Vec<ErrorEntry>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT at, path, message FROM errors ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], |row| {
            Ok(ErrorEntry {
                at: row.get(0)?,
                path: row.get(1)?,
                message: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        let conn = self.conn();
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()
        .map_err(Into::into)
    }
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        path: row.get(0)?,
        stamp: FileStamp {
            size: row.get::<_, i64>(1)? as u64,
            mtime_ns: row.get(2)?,
            inode: row.get::<_, i64>(3)? as u64,
        },
        sha256: row.get(4)?,
        etag: row.get(5)?,
        diverged: row.get(6)?,
    })
}

fn pending_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Pending> {
    Ok(Pending {
        path: row.get(0)?,
        target: row.get(1)?,
        session_id: row.get(2)?,
        stamp: FileStamp {
            size: row.get::<_, i64>(3)? as u64,
            mtime_ns: row.get(4)?,
            inode: row.get::<_, i64>(5)? as u64,
        },
        sha256: row.get(6)?,
    })
}

/// The current time as `status` prints it.
pub fn now_text() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str, inode: u64) -> Record {
        Record {
            path: path.into(),
            stamp: FileStamp {
                size: 3,
                mtime_ns: 7,
                inode,
            },
            sha256: "ab".into(),
            etag: "e1".into(),
            diverged: false,
        }
    }

    #[test]
    fn a_journal_from_before_diverged_records_is_read_and_then_upgraded() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
                 sha256 TEXT NOT NULL, etag TEXT NOT NULL);
                 INSERT INTO files VALUES ('a', 3, 7, 1, 'ab', 'e1');",
            )
            .unwrap();
        }
        let old = Journal::open_read_only(&path).unwrap();
        assert_eq!(old.record("a").unwrap(), Some(record("a", 1)));
        drop(old);
        let journal = Journal::open(&path).unwrap();
        assert_eq!(journal.record("a").unwrap(), Some(record("a", 1)));
        let diverged = Record {
            diverged: true,
            ..record("b", 2)
        };
        journal.commit(&diverged).unwrap();
        assert_eq!(journal.record("b").unwrap(), Some(diverged));
    }

    #[test]
    fn directory_rename_moves_only_that_subtree() {
        let j = Journal::in_memory().unwrap();
        for (p, i) in [
            ("a/x", 1),
            ("a/b/y", 2),
            ("ab/z", 3),
            ("a", 4),
            ("a-x", 5),
            ("a.b", 6),
            ("a0", 7),
        ] {
            j.commit(&record(p, i)).unwrap();
        }
        let under_a: Vec<String> = j.records_under("a").unwrap().into_keys().collect();
        assert_eq!(under_a, ["a", "a/b/y", "a/x"]);
        j.rename("a", "c/d").unwrap();
        let paths: Vec<String> = j.records_under("").unwrap().into_keys().collect();
        assert_eq!(
            paths,
            ["a-x", "a.b", "a0", "ab/z", "c/d", "c/d/b/y", "c/d/x"]
        );
        let under: Vec<String> = j.records_under("c/d").unwrap().into_keys().collect();
        assert_eq!(under, ["c/d", "c/d/b/y", "c/d/x"]);
    }

    #[test]
    fn a_rename_replaces_what_the_journal_held_at_the_new_name() {
        let j = Journal::in_memory().unwrap();
        let pending = |path: &str, session: &str| Pending {
            path: path.into(),
            target: path.into(),
            session_id: session.into(),
            stamp: record(path, 1).stamp,
            sha256: String::new(),
        };
        j.commit(&record("a", 1)).unwrap();
        j.set_pending(&pending("a", "s-a")).unwrap();
        // An upload of the new name that failed, and one beside it.
        j.set_pending(&pending("b", "s-b")).unwrap();
        j.set_pending(&pending("b2", "s-b2")).unwrap();
        j.commit(&record("d/x", 2)).unwrap();
        j.commit(&record("e/x", 3)).unwrap();
        j.commit(&record("e/y", 4)).unwrap();

        j.rename("a", "b").unwrap();
        assert_eq!(j.record("b").unwrap().unwrap().stamp.inode, 1);
        assert_eq!(j.pending("b").unwrap().unwrap().session_id, "s-a");
        assert!(j.pending("b2").unwrap().is_some(), "not in the way");
        j.rename("d", "e").unwrap();
        assert_eq!(j.record("e/x").unwrap().unwrap().stamp.inode, 2);
        assert!(j.record("e/y").unwrap().is_some(), "not in the way");
        assert!(j.records_under("d").unwrap().is_empty());
    }

    #[test]
    fn a_recorded_rename_settles_its_intent() {
        let j = Journal::in_memory().unwrap();
        j.commit(&record("a", 1)).unwrap();
        for (from, to) in [("a", "b"), ("c", "d")] {
            j.begin_move(&PendingMove {
                from: from.into(),
                to: to.into(),
                dir: false,
            })
            .unwrap();
        }
        j.rename("a", "b").unwrap();
        let left = j.pending_moves().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].from.as_str(), left[0].to.as_str()), ("c", "d"));
        j.clear_move("c").unwrap();
        assert!(j.pending_moves().unwrap().is_empty());
        assert!(j.record("b").unwrap().is_some());
    }

    #[test]
    fn records_are_found_by_inode() {
        let j = Journal::in_memory().unwrap();
        for (p, i) in [("a", 1), ("b/link", 1), ("c", 2)] {
            j.commit(&record(p, i)).unwrap();
        }
        let linked: Vec<String> = j
            .records_with_inode(1)
            .unwrap()
            .into_iter()
            .map(|r| r.path)
            .collect();
        assert_eq!(linked, ["a", "b/link"]);
        assert!(j.records_with_inode(3).unwrap().is_empty());
    }

    #[test]
    fn commit_clears_the_pending_session() {
        let j = Journal::in_memory().unwrap();
        let r = record("f", 1);
        j.set_pending(&Pending {
            path: "f".into(),
            target: "f".into(),
            session_id: "s1".into(),
            stamp: r.stamp,
            sha256: r.sha256.clone(),
        })
        .unwrap();
        assert_eq!(j.pending("f").unwrap().unwrap().session_id, "s1");
        j.commit(&r).unwrap();
        assert!(j.pending("f").unwrap().is_none());
        assert_eq!(j.record("f").unwrap(), Some(r));
    }

    #[test]
    fn errors_are_capped_newest_first() {
        let j = Journal::in_memory().unwrap();
        for i in 0..(ERRORS_KEPT + 10) {
            j.add_error("p", &format!("e{i}")).unwrap();
        }
        let recent = j.recent_errors(1000).unwrap();
        assert_eq!(recent.len() as i64, ERRORS_KEPT);
        assert_eq!(recent[0].message, format!("e{}", ERRORS_KEPT + 9));
    }
}
